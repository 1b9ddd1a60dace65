using QcowTier.Cli.Disks;
using QcowTier.Cli.Infrastructure;

namespace QcowTier.Cli.Commands;

/// <summary>qemu-img create.</summary>
internal sealed class CreateCommand : Command
{
    public override string Name => "create";

    public override string Synopsis => "create [-q] [-f fmt] [-b backing_file -F backing_fmt] [-u] [-o options] filename [size]";

    public override string Help => """
        Creates an image (replacing any existing file) and prints qemu-img's "Formatting" line.
          -f fmt       qcow2 or raw (default raw)
          -o options   comma-separated key=value list; '-o help' lists them. qcow2: cluster_size,
                       refcount_bits, compat=0.10|1.1|v2|v3, lazy_refcounts=on|off,
                       preallocation=off|metadata|falloc|full, data_file=NAME (QEMU external
                       data file, relative to the image's folder), data_file_raw=on|off.
                       raw: preallocation=off|falloc|full
          -b file      backing file (qcow2): stored as given, a relative name is relative to the new
                       image's folder; the size defaults to the backing file's
          -F fmt       format of the backing file, qcow2 or raw (required with -b)
          -u           do not open the backing file (it may not exist yet; a size is then required)
          -q           quiet: print nothing on success
          size         bytes, or with a suffix k, M, G, T, P, E (also b, K); rounded up to 512

        """;

    public override int Run(IReadOnlyList<string> args, CliContext ctx)
    {
        var o = new OptionParser("F:b:f:o:qu", ("object", true)).Parse(args);
        if (o.WantsHelp)
        {
            return PrintHelp(ctx);
        }
        var format = o.Get("f") ?? "raw";
        var optionArgs = o.GetAll("o").ToList();
        if (CreateOptions.IsHelp(optionArgs))
        {
            DiskOpener.CheckFormat(format);
            CreateOptions.PrintHelp(format, ctx.Out);
            return 0;
        }
        if (o.Operands.Count == 0)
        {
            throw new CliException("Expecting image file name");
        }
        var path = o.Operands[0];
        try
        {
            DiskOpener.CheckFormat(format);
        }
        catch (CliException e)
        {
            throw new CliException($"{path}: {e.Message}", e);
        }
        if (o.Operands.Count > 2)
        {
            throw new CliException($"Unexpected argument: {o.Operands[2]}");
        }
        long? size = o.Operands.Count > 1 ? SizeParser.Parse("image size", o.Operands[1]) : null;
        CreateOptions options;
        try
        {
            options = CreateOptions.Parse(format, optionArgs);
            // As qemu-img: -b and -F override the -o values.
            if (format != "qcow2" && (o.Has("b") || o.Has("F")))
            {
                throw new CliException($"Backing file not supported for file format '{format}'");
            }
            if (o.Get("b") is { } b)
            {
                options.SetText("backing_file", b);
            }
            if (o.Get("F") is { } f)
            {
                options.SetText("backing_fmt", f);
            }
            if (CreateBacking.SizeFrom(path, format, options, o.Has("u")) is { } backingSize && size is null && options.Number("size") is null)
            {
                size = backingSize;
            }
            if (size is { } s)
            {
                if (options.IsSet("size"))
                {
                    throw new CliException("The image size must be specified only once");
                }
                options.SetSize((ulong)s);
            }
            else if (options.Number("size") is null)
            {
                throw new CliException("Image creation needs a size parameter");
            }
        }
        catch (CliException e)
        {
            throw new CliException($"{path}: {e.Message}", e);
        }
        var virtualSize = options.Number("size")!.Value;
        if (!o.Has("q"))
        {
            ctx.Out.WriteLine($"Formatting '{path}', fmt={format} {options.Describe()}");
            ctx.Out.Flush();
        }
        try
        {
            if (virtualSize > long.MaxValue - 511)
            {
                throw new CliException("Invalid image size specified");
            }
            if (format == "qcow2")
            {
                ImageFactory.CreateQcow(path, (long)virtualSize, options.ToQcow((long)virtualSize, unsafeBacking: o.Has("u")));
            }
            else
            {
                ImageFactory.CreateRaw(path, (long)virtualSize, options.RawPreallocation());
            }
        }
        catch (CliException e) when (!e.Message.StartsWith(path + ": ", StringComparison.Ordinal))
        {
            throw new CliException($"{path}: {e.Message}", e);
        }
        return 0;
    }
}
