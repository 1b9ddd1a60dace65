using System.Globalization;
using QcowTier.Cli.Disks;
using QcowTier.Cli.Infrastructure;

namespace QcowTier.Cli.Commands;

/// <summary>qemu-img measure: the file size a new image needs, for a virtual size or for a copy of an image.</summary>
internal sealed class MeasureCommand : Command
{
    public override string Name => "measure";

    public override string Synopsis => "measure [--output=human|json] [-O output_fmt] [-o options] [--size N | [-f fmt] filename]";

    public override string Help => """
        Prints the file size a new image needs ("required size": for the data of FILE, or empty with
        --size) and the size of the image fully allocated, with the same figures as qemu-img.
          -O output_fmt   qcow2 or raw (default raw)
          -o options      the target's creation options: cluster_size, refcount_bits, compat,
                          preallocation (falloc and full count every cluster), extended_l2
          --size N        measure an empty image of N bytes instead of a copy of FILE
          -f fmt          FILE's format (default: detected)
          --output=human|json

        """;

    public override int Run(IReadOnlyList<string> args, CliContext ctx)
    {
        var o = new OptionParser("f:O:o:l:U", ("output", true), ("size", true), ("object", true), ("image-opts", false), ("force-share", false)).Parse(args);
        if (o.WantsHelp)
        {
            return PrintHelp(ctx);
        }
        var json = ParseJsonOutput(o);
        var sizeText = o.Get("size");
        if (o.Operands.Count > 1)
        {
            throw new CliException("At most one filename argument is allowed.");
        }
        if (sizeText is not null && o.Operands.Count == 1)
        {
            throw new CliException("--size N cannot be used together with a filename.");
        }
        if (sizeText is null && o.Operands.Count == 0)
        {
            throw new CliException("Either --size N or one filename must be specified.");
        }
        var format = o.Get("O") ?? "raw";
        if (format is not ("qcow2" or "raw"))
        {
            DiskOpener.CheckFormat(format);
        }
        var options = CreateOptions.Parse(format, o.GetAll("o"));
        var target = format == "qcow2" ? Qcow2Target(options) : null;

        Disk? source = null;
        try
        {
            long size;
            if (sizeText is not null)
            {
                size = SizeParser.Parse("image size", sizeText);
            }
            else
            {
                source = DiskOpener.Open(o.Operands[0], o.Get("f"), writable: false);
                size = source.Size;
            }
            long required, full, bitmapBytes = 0;
            bool bitmaps;
            if (target is null)
            {
                // A raw target holds every byte of the virtual disk.
                required = full = size;
                bitmaps = false;
            }
            else
            {
                long data = 0;
                if (source is not null)
                {
                    var runs = source.GetStatus(0, size).Select(s => (s.Start, s.Length, s.Present && s.Data && !s.Zero));
                    data = Engine.QcowMeasure.CountData(runs, target.Value.Options.ClusterSize); // the library's rule, as qemu-img counts
                }
                QcowMeasurement m;
                try
                {
                    m = QcowImage.Measure(size, target.Value.Options, data);
                }
                catch (ArgumentException e)
                {
                    throw new CliException(e.Message.Split(" (Parameter", 2)[0], e);
                }
                (required, full) = (m.RequiredBytes, m.FullyAllocatedBytes);
                // QEMU reports bitmaps only when both ends can hold them: a v3 target and a qcow2 source.
                bitmaps = target.Value.Options.Compat == QcowCompat.V3 && source is QcowDisk;
                if (bitmaps && source is QcowDisk q)
                {
                    bitmapBytes = BitmapsSize(q.Image.GetBitmaps(), size, target.Value.Options.ClusterSize);
                }
            }
            var inv = CultureInfo.InvariantCulture;
            if (json)
            {
                ctx.Out.WriteLine("{");
                if (bitmaps)
                {
                    ctx.Out.WriteLine(string.Create(inv, $"    \"bitmaps\": {bitmapBytes},"));
                }
                ctx.Out.WriteLine(string.Create(inv, $"    \"required\": {required},"));
                ctx.Out.WriteLine(string.Create(inv, $"    \"fully-allocated\": {full}"));
                ctx.Out.WriteLine("}");
            }
            else
            {
                ctx.Out.WriteLine(string.Create(inv, $"required size: {required}"));
                ctx.Out.WriteLine(string.Create(inv, $"fully allocated size: {full}"));
                if (bitmaps)
                {
                    ctx.Out.WriteLine(string.Create(inv, $"bitmaps size: {bitmapBytes}"));
                }
            }
            return 0;
        }
        finally
        {
            source?.Dispose();
        }
    }

    /// <summary>The qcow2 options that change the figures, checked with qemu-img's wording (data_file and the like do not count).</summary>
    private static (QcowCreateOptions Options, bool ExtendedL2)? Qcow2Target(CreateOptions options)
    {
        if (options.Flag("extended_l2"))
        {
            throw new CliException("extended L2 entries (extended_l2=on) are not supported yet");
        }
        var compat = options.Text("compat") switch
        {
            null or "v3" or "1.1" => QcowCompat.V3,
            "v2" or "0.10" => QcowCompat.V2,
            var other => throw new CliException($"Invalid compatibility level: '{other}'"),
        };
        var clusterSize = options.Number("cluster_size")!.Value;
        if (clusterSize < 512 || clusterSize > 2 * 1024 * 1024 || (clusterSize & (clusterSize - 1)) != 0)
        {
            throw new CliException("Cluster size must be a power of two between 512 and 2048k");
        }
        var refcountBits = options.Number("refcount_bits")!.Value;
        if (refcountBits is 0 or > 64 || (refcountBits & (refcountBits - 1)) != 0)
        {
            throw new CliException("Refcount width must be a power of two and may not exceed 64 bits");
        }
        if (compat == QcowCompat.V2 && refcountBits != 16)
        {
            throw new CliException("Different refcount widths than 16 bits require compatibility level 1.1 or above (use compat=1.1 or greater)");
        }
        var prealloc = options.Text("preallocation") switch
        {
            null or "off" => QcowPreallocation.Off,
            "metadata" => QcowPreallocation.Metadata,
            "falloc" => QcowPreallocation.Falloc,
            "full" => QcowPreallocation.Full,
            var other => throw new CliException($"invalid parameter value: {other}"),
        };
        return (new QcowCreateOptions
        {
            ClusterSize = (int)clusterSize,
            RefcountBits = (int)refcountBits,
            Compat = compat,
            Preallocation = prealloc,
        }, options.Flag("extended_l2"));
    }

    /// <summary>
    /// What copying the source's persistent bitmaps needs in the target, as QEMU counts it: every bitmap
    /// fully allocated (one bit per granule, in target clusters) plus its table, and the directory.
    /// </summary>
    private static long BitmapsSize(IReadOnlyList<QcowBitmapInfo> bitmaps, long diskSize, int clusterSize)
    {
        static long RoundUp(long v, long a) => (v + a - 1) / a * a;
        long total = 0, directory = 0;
        foreach (var b in bitmaps)
        {
            var bits = (diskSize + b.Granularity - 1) / b.Granularity;
            var clusters = ((bits + 7) / 8 + clusterSize - 1) / clusterSize;
            total += clusters * clusterSize + RoundUp(clusters * 8, clusterSize);
            directory += RoundUp(24 + System.Text.Encoding.UTF8.GetByteCount(b.Name), 8);
        }
        return total + RoundUp(directory, clusterSize);
    }
}
