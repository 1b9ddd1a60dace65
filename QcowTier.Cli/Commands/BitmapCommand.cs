using QcowTier.Cli.Disks;
using QcowTier.Cli.Infrastructure;

namespace QcowTier.Cli.Commands;

/// <summary>qemu-img bitmap: add, remove, clear, enable and disable persistent dirty bitmaps; their info rendering.</summary>
internal sealed class BitmapCommand : Command
{
    public override string Name => "bitmap";

    public override string Synopsis => "bitmap (--merge source | --add | --remove | --clear | --enable | --disable)... [-g granularity] [-f fmt] [-q] filename bitmap";

    public override string Help => """
        Changes a persistent dirty bitmap of a qcow2 (version 3) image; the actions run in the order given.
          --add           add a clean bitmap (enabled: it records every later write)
          --remove        remove the bitmap
          --clear         mark every bit clean
          --enable        record writes (the AUTO flag)
          --disable       stop recording writes
          --merge source  mark dirty every range bitmap 'source' of the same image marks
          -g granularity  bytes per bit for --add (default 64k)
          -f fmt          qcow2 (default: detected)
        Merging from another image (-b) is not supported yet.

        """;

    public override int Run(IReadOnlyList<string> args, CliContext ctx)
    {
        var o = new OptionParser("g:f:qhb:F:", ("add", false), ("remove", false), ("clear", false), ("enable", false), ("disable", false),
            ("merge", true), ("object", true), ("image-opts", false), ("help", false)).Parse(args);
        if (o.WantsHelp)
        {
            return PrintHelp(ctx);
        }
        var steps = o.Options.Where(x => x.Key is "add" or "remove" or "clear" or "enable" or "disable" or "merge").ToList();
        var actions = steps.Select(x => x.Key).ToList();
        if (actions.Count == 0)
        {
            throw new CliException("Need at least one of --add, --remove, --clear, --enable, --disable, or --merge");
        }
        if (o.Operands.Count != 2)
        {
            throw new CliException("Expecting filename and bitmap name");
        }
        var mergeFile = o.Get("b");
        if (mergeFile is not null && !actions.Contains("merge"))
        {
            throw new CliException("-b and -F are only supported with --merge");
        }
        long granularity = 65536;
        if (o.Get("g") is { } g)
        {
            if (!actions.Contains("add"))
            {
                throw new CliException("granularity only supported with --add");
            }
            if (SizeParser.TryParse(g, out var n) != SizeParser.Outcome.Ok || n > long.MaxValue)
            {
                throw new CliException("Invalid granularity specified");
            }
            granularity = (long)n;
        }
        var (path, name) = (o.Operands[0], o.Operands[1]);
        using var disk = DiskOpener.Open(path, o.Get("f"), writable: true);
        if (disk is not QcowDisk q)
        {
            throw new CliException($"Operation {actions[0]} on bitmap {name} failed: Block format 'raw' used by device '' does not support persistent bitmaps");
        }
        foreach (var (act, source) in steps)
        {
            var exists = q.Image.GetBitmaps().Any(b => b.Name == name);
            string? error = act switch
            {
                "merge" when mergeFile is null && !q.Image.GetBitmaps().Any(b => b.Name == source) => $"Dirty bitmap '{source}' not found",
                "add" when exists => $"Bitmap already exists: {name}",
                "add" when granularity < 512 || (granularity & (granularity - 1)) != 0 => "Granularity must be power of 2 and at least 512",
                not "add" when !exists => $"Dirty bitmap '{name}' not found",
                _ => null,
            };
            if (error is not null)
            {
                throw new CliException($"Operation {act} on bitmap {name} failed: {error}");
            }
            try
            {
                switch (act)
                {
                    case "add": q.Image.AddBitmap(name, granularity); break;
                    case "remove": q.Image.RemoveBitmap(name); break;
                    case "clear": q.Image.ClearBitmap(name); break;
                    case "merge" when mergeFile is not null: MergeFrom(mergeFile, o.Get("F"), source!, q.Image, name); break;
                    case "merge": q.Image.MergeBitmap(name, source!); break;
                    default: q.Image.SetBitmapEnabled(name, act == "enable"); break;
                }
            }
            catch (Exception e) when (e is IOException or ArgumentException or InvalidOperationException)
            {
                throw new CliException($"Operation {act} on bitmap {name} failed: {e.Message}", e);
            }
        }
        return 0;
    }

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

    /// <summary>--merge SOURCE -b FILE: the dirty ranges of bitmap SOURCE of another image, read-only with a shared lock.</summary>
    private static void MergeFrom(string file, string? format, string source, QcowImage target, string name)
    {
        using var other = Disks.DiskOpener.Open(file, format, writable: false);
        if (other is not Disks.QcowDisk q)
        {
            throw new CliException($"Dirty bitmap '{source}' not found");
        }
        if (!q.Image.GetBitmaps().Any(b => b.Name == source))
        {
            throw new CliException($"Operation merge on bitmap {name} failed: Dirty bitmap '{source}' not found");
        }
        if (q.Image.Size != target.Size)
        {
            throw new CliException($"Operation merge on bitmap {name} failed: Bitmaps are of different sizes (destination size is {target.Size}, source size is {q.Image.Size}) and can't be merged");
        }
        target.MarkBitmapDirty(name, q.Image.GetBitmapDirtyRanges(source));
    }
}
