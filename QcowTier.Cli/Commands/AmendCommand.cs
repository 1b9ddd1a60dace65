using QcowTier.Cli.Disks;
using QcowTier.Cli.Infrastructure;

namespace QcowTier.Cli.Commands;

/// <summary>qemu-img amend: changes compat, lazy_refcounts, refcount_bits (and size) of a qcow2 image in place.</summary>
internal sealed class AmendCommand : Command
{
    /// <summary>The qcow2 options QEMU can amend; every other creation option is refused by name.</summary>
    private static readonly string[] Amendable = ["compat", "lazy_refcounts", "refcount_bits", "size", "data_file", "data_file_raw", "backing_file", "backing_fmt"];

    public override string Name => "amend";

    public override string Synopsis => "amend [-p] [-q] [-f fmt] [-t cache] [--force] -o options filename";

    public override string Help => """
        Changes format options of a qcow2 image in place, crash-safely.
          -o options   compat=0.10|1.1 (a downgrade expands zero clusters; refused with refcount widths
                       other than 16 bits or incompatible features), lazy_refcounts=on|off,
                       refcount_bits=1..64 (the refcount structures are rewritten), size
          -f fmt       qcow2 (default: detected)
          -p, -q       progress (accepted, not shown) / quiet

        """;

    public override int Run(IReadOnlyList<string> args, CliContext ctx)
    {
        var o = new OptionParser("f:o:t:pqU", ("force", false), ("object", true), ("image-opts", false)).Parse(args);
        if (o.WantsHelp)
        {
            return PrintHelp(ctx);
        }
        var optionArgs = o.GetAll("o").ToList();
        if (optionArgs.Count == 0)
        {
            throw new CliException("Must specify options (-o)");
        }
        if (o.Operands.Count == 0)
        {
            throw new CliException("Expecting one image file name");
        }
        if (o.Operands.Count > 1)
        {
            throw new CliException($"Unexpected argument: {o.Operands[1]}");
        }
        var path = o.Operands[0];
        var format = o.Get("f") ?? DiskOpener.Probe(path);
        if (format != "qcow2")
        {
            throw new CliException($"Format driver '{format}' does not support option amendment");
        }
        var options = CreateOptions.Parse("qcow2", optionArgs);
        foreach (var key in CreateOptions.Keys(optionArgs))
        {
            if (!Amendable.Contains(key))
            {
                throw new CliException($"Invalid parameter '{key}': This option is only supported for image creation");
            }
        }
        QcowCompat? compat = options.IsSet("compat")
            ? options.Text("compat") switch
            {
                "v3" or "1.1" => QcowCompat.V3,
                "v2" or "0.10" => QcowCompat.V2,
                var other => throw new CliException($"Unknown compatibility level {other}"),
            }
            : null;
        bool? lazy = options.IsSet("lazy_refcounts") ? options.Flag("lazy_refcounts") : null;
        int? bits = options.IsSet("refcount_bits") ? (int)Math.Min(int.MaxValue, options.Number("refcount_bits")!.Value) : null;
        long? size = options.IsSet("size") ? (long)options.Number("size")!.Value : null;
        if (options.IsSet("backing_file") || options.IsSet("backing_fmt"))
        {
            throw new CliException("backing files are not supported yet");
        }

        using var disk = DiskOpener.Open(path, "qcow2", writable: true);
        var image = ((QcowDisk)disk).Image;
        if ((options.IsSet("data_file") || options.IsSet("data_file_raw")) && image.ExternalDataFile is null)
        {
            throw new CliException(options.IsSet("data_file")
                ? "data-file can only be set for images that use an external data file"
                : "data-file-raw cannot be set on existing images");
        }
        if (options.IsSet("data_file") || options.IsSet("data_file_raw"))
        {
            throw new CliException("changing the external data file of an image is not supported yet");
        }
        try
        {
            if (size is { } s && s != image.Size)
            {
                image.Resize(s);
            }
            image.Amend(new QcowAmendOptions { Compat = compat, LazyRefcounts = lazy, RefcountBits = bits });
            image.Flush();
        }
        catch (Exception e) when (e is ArgumentException or NotSupportedException)
        {
            throw new CliException(e.Message.Split(" (Parameter '", 2)[0], e);
        }
        return 0;
    }
}
