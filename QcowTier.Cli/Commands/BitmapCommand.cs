using QcowTier.Cli.Infrastructure;

namespace QcowTier.Cli.Commands;

/// <summary>Persistent dirty bitmaps as qemu-img shows them (info's "bitmaps").</summary>
internal static class BitmapCommand
{
    /// <summary>Qcow2BitmapInfo: name, granularity, flags ("in-use" before "auto", as QEMU lists them).</summary>
    public static QDict ToQDict(QcowBitmapInfo b)
    {
        var flags = new List<object>();
        if (b.InUse)
        {
            flags.Add("in-use");
        }
        if (b.Enabled)
        {
            flags.Add("auto");
        }
        return new QDict().Add("name", b.Name).Add("granularity", b.Granularity).Add("flags", flags);
    }

    /// <summary>QEMU's dump_qobject for the human info output: nested dicts and lists indented by four, list items as [i].</summary>
    public static void DumpHuman(string key, object value, int depth, TextWriter w)
    {
        var indent = new string(' ', depth * 4);
        var label = key.Replace('-', ' ');
        switch (value)
        {
            case QDict dict:
                w.WriteLine($"{indent}{label}:");
                foreach (var (k, v) in dict.InQemuOrder())
                {
                    DumpHuman(k, v, depth + 1, w);
                }
                break;
            case System.Collections.IList list:
                w.WriteLine($"{indent}{label}:");
                for (var i = 0; i < list.Count; i++)
                {
                    DumpHuman($"[{i}]", list[i]!, depth + 1, w);
                }
                break;
            case bool b:
                w.WriteLine($"{indent}{label}: {(b ? "true" : "false")}");
                break;
            default:
                w.WriteLine($"{indent}{label}: {Convert.ToString(value, System.Globalization.CultureInfo.InvariantCulture)}");
                break;
        }
    }
}
