using System.Text;
using QcowTier.Cli.Disks;
using QcowTier.Cli.Infrastructure;

namespace QcowTier.Cli.Commands;

/// <summary>qemu-img map: the same entries, merged the same way, in the same two formats.</summary>
internal sealed class MapCommand : Command
{
    public override string Name => "map";

    public override string Synopsis => "map [-f fmt] [--output=human|json] [--start-offset=OFFSET] [--max-length=LEN] [-U] filename";

    public override string Help => """
        Prints how the virtual disk is laid out: which ranges hold data, which read as zeroes, and where
        they live in the file.
          -f fmt                  qcow2 or raw (default: detected)
          --output=human|json     human lists the data ranges; json lists every range with its flags
                                  (start, length, depth, present, zero, data, offset)
          --start-offset=OFFSET   first byte to map
          --max-length=LEN        bytes to map at most

        """;

    public override int Run(IReadOnlyList<string> args, CliContext ctx)
    {
        var o = new OptionParser("f:U", ("output", true), ("start-offset", true), ("max-length", true), ("image-opts", false), ("force-share", false)).Parse(args);
        if (o.WantsHelp)
        {
            return PrintHelp(ctx);
        }
        var json = ParseJsonOutput(o);
        var start = o.Get("start-offset") is { } so ? SizeParser.Parse("start offset", so) : 0;
        var maxLength = o.Get("max-length") is { } ml ? SizeParser.Parse("max length", ml) : -1;
        if (o.Operands.Count != 1)
        {
            throw new CliException(o.Operands.Count == 0 ? "Expecting one image file name" : $"Unexpected argument: {o.Operands[1]}");
        }
        using var disk = DiskOpener.Open(o.Operands[0], o.Get("f"), writable: false);
        var length = disk.Size;
        if (maxLength != -1)
        {
            length = Math.Min(start + maxLength, length);
        }
        var w = ctx.Out;
        if (json)
        {
            w.Write('[');
        }
        else
        {
            w.WriteLine($"{"Offset",-16}{"Length",-16}{"Mapped to",-16}File");
        }
        var curr = new BlockStatus(start, 0, false, false, false, null);
        var sb = new StringBuilder();
        if (start < length)
        {
            foreach (var next in disk.GetStatus(start, length - start))
            {
                if (curr.CanMerge(next))
                {
                    curr = curr.Extend(next.Length);
                    continue;
                }
                if (curr.Length > 0)
                {
                    Dump(curr, last: false, json, disk.FileName, w, sb);
                }
                curr = next;
            }
        }
        Dump(curr, last: true, json, disk.FileName, w, sb);
        if (json)
        {
            w.WriteLine(']');
        }
        return 0;
    }

    /// <summary>dump_map_entry.</summary>
    private static void Dump(in BlockStatus e, bool last, bool json, string fileName, TextWriter w, StringBuilder sb)
    {
        if (!json)
        {
            if (e.Data && e.Offset is null)
            {
                throw new CliException("File contains external, encrypted or compressed clusters.");
            }
            if (e.Data && !e.Zero)
            {
                w.WriteLine($"{Hex(e.Start),-16}{Hex(e.Length),-16}{Hex(e.Offset ?? 0),-16}{e.File ?? fileName}");
            }
            return;
        }
        sb.Clear();
        sb.Append("{ \"start\": ").Append(e.Start)
            .Append(", \"length\": ").Append(e.Length)
            .Append(", \"depth\": ").Append(e.Depth).Append(", \"present\": ").Append(e.Present ? "true" : "false")
            .Append(", \"zero\": ").Append(e.Zero ? "true" : "false")
            .Append(", \"data\": ").Append(e.Data ? "true" : "false");
        if (e.Offset is { } off)
        {
            sb.Append(", \"offset\": ").Append(off);
        }
        if (e.Tier is { } tier)
        {
            // Beside qemu-img's fields: which file the offset is in.
            sb.Append(", \"tier\": \"").Append(tier == StorageTier.Ssd ? "ssd" : "hdd").Append('"');
        }
        sb.Append('}');
        if (!last)
        {
            sb.Append(",\n");
        }
        w.Write(sb);
    }

    /// <summary>printf's "%#x": 0x-prefixed, except zero.</summary>
    private static string Hex(long v) => v == 0 ? "0" : "0x" + v.ToString("x", System.Globalization.CultureInfo.InvariantCulture);
}
