using QcowTier.Cli.Disks;
using QcowTier.Cli.Infrastructure;

namespace QcowTier.Cli.Commands;

/// <summary>
/// qemu-img convert between qcow2 and raw. Ranges the source reports as zero are never read; data
/// is read in large chunks with several reads in flight while a single writer stores them in guest
/// order (so a qcow2 target is laid out sequentially), skipping blocks of -S bytes that are all zero.
/// </summary>
internal sealed class ConvertCommand : Command
{
    private const int ChunkSize = 2 << 20;
    private const long MaxSparse = 32768L * 512;

    public override string Name => "convert";

    public override string Synopsis => "convert [-c] [-p] [-q] [-n] [-f fmt] [-t cache] [-T src_cache] [-O output_fmt] [-o options] [-l snapshot_param] [-S sparse_size] [-m num] [-W] filename output_filename";

    public override string Help => """
        Copies the guest-visible content of an image into a new image of the same size.
          -f fmt           source format (default: detected)
          -O fmt           output format, qcow2 or raw (default raw)
          -o options       creation options of the output, as for create
          -c               compress the output's clusters (qcow2; compression_type picks zlib or zstd)
          -l snapshot      copy an internal snapshot of the source instead of its active disk:
                           'snapshot.id=ID', 'snapshot.name=NAME', or an id or name
          -S size          a block of this many zero bytes is left unallocated in the output
                           (default 4k; 0 writes everything, fully allocating the output)
          -t cache         cache mode of the output (default unsafe, as qemu-img: not flushed to disk)
          -T cache         cache mode of the source
          -B file          make the output a qcow2 overlay of this backing file (-F its format), copying
                           only what the source's top image allocates: the backing file must hold what
                           the source's backing chain holds
          -n               write into an existing output instead of creating it
          --target-is-zero with -n: the existing output already reads as zeroes
          -m num           parallelism, as qemu-img's coroutines (1 to 16, default 8)
          -W               accepted for compatibility (writes are always ordered)
          -p               show progress
          -q               quiet

        """;

    public override int Run(IReadOnlyList<string> args, CliContext ctx)
    {
        var o = new OptionParser("f:O:B:F:Cco:l:S:pt:T:qnm:WUr:", ("object", true), ("image-opts", false), ("target-image-opts", false),
            ("salvage", false), ("target-is-zero", false), ("bitmaps", false), ("skip-broken-bitmaps", false), ("force-share", false)).Parse(args);
        if (o.WantsHelp)
        {
            return PrintHelp(ctx);
        }
        var outFormat = o.Get("O") ?? "raw";
        DiskOpener.CheckFormat(outFormat);
        var optionArgs = o.GetAll("o").ToList();
        if (CreateOptions.IsHelp(optionArgs))
        {
            CreateOptions.PrintHelp(outFormat, ctx.Out);
            return 0;
        }
        if (o.Has("c") && outFormat != "qcow2")
        {
            throw new CliException("Compression not supported for this file format");
        }
        var outBacking = o.Get("B");
        if (outBacking is not null && o.Has("n"))
        {
            throw new CliException("-B cannot be used with -n");
        }
        var snapshot = o.Get("l") is { } l ? SnapshotParam(l) : null;
        var sparse = 4096L;
        if (o.Get("S") is { } sText)
        {
            sparse = SizeParser.TryParse(sText, out var sv) == SizeParser.Outcome.Ok ? (long)Math.Min(sv, long.MaxValue) : -1;
            if (sparse < 0 || sparse % 512 != 0 || sparse > MaxSparse)
            {
                throw new CliException($"Invalid buffer size for sparse output specified. Valid sizes are multiples of 512 up to {MaxSparse}. Select 0 to disable sparse detection (fully allocates output).");
            }
        }
        var depth = 8;
        if (o.Get("m") is { } mText)
        {
            if (!int.TryParse(mText, out depth) || depth is < 1 or > 16)
            {
                throw new CliException("Invalid number of coroutines. Allowed number of coroutines is between 1 and 16");
            }
        }
        // As qemu-img: the output is written with cache=unsafe unless -t says otherwise (no final fsync).
        var targetCache = CacheMode.Parse(o.Get("t") ?? "unsafe", $"Invalid cache option: {o.Get("t")}");
        var sourceCache = CacheMode.Parse(o.Get("T"), $"Invalid source cache option: {o.Get("T")}");
        var skipCreate = o.Has("n");
        var targetIsZero = o.Has("target-is-zero");
        if (targetIsZero && !skipCreate)
        {
            throw new CliException("--target-is-zero requires use of -n flag");
        }
        if (o.Operands.Count < 2)
        {
            throw new CliException(o.Operands.Count == 0 ? "Must specify image file name" : "Expecting an output file name");
        }
        if (o.Operands.Count > 2)
        {
            throw new CliException("Converting several source images into one is not supported yet");
        }
        var (srcPath, dstPath) = (o.Operands[0], o.Operands[1]);
        using var source = DiskOpener.Open(srcPath, o.Get("f"), writable: false, sourceCache, snapshot: snapshot);
        var size = source.Size;
        if (!skipCreate)
        {
            var options = CreateOptions.Parse(outFormat, optionArgs);
            if (options.IsSet("size"))
            {
                throw new CliException("Invalid parameter 'size'");
            }
            if (outBacking is not null)
            {
                if (outFormat != "qcow2")
                {
                    throw new CliException($"Backing file not supported for file format '{outFormat}'");
                }
                options.SetText("backing_file", outBacking);
                if (o.Get("F") is { } bf)
                {
                    options.SetText("backing_fmt", bf);
                }
                CreateBacking.SizeFrom(dstPath, outFormat, options, unsafeBacking: false);
            }
            try
            {
                if (outFormat == "qcow2")
                {
                    ImageFactory.CreateQcow(dstPath, size, options.ToQcow(size));
                }
                else
                {
                    ImageFactory.CreateRaw(dstPath, size, options.RawPreallocation());
                }
            }
            catch (CliException e) when (!e.Message.StartsWith(dstPath + ": ", StringComparison.Ordinal))
            {
                throw new CliException($"{dstPath}: {e.Message}", e);
            }
        }
        using var target = DiskOpener.Open(dstPath, skipCreate ? o.Get("O") : outFormat, writable: true, targetCache);
        if (skipCreate && target.Size < size)
        {
            throw new CliException("Target image is smaller than the source");
        }
        var progress = new Progress(ctx, o.Has("p") && !o.Has("q"));
        // -m counts qemu-img's coroutines; here a reader thread stands for four of them (two by default).
        if (outBacking is not null)
        {
            // -B: the output's backing file holds what the source's backing chain holds; copy the top layer only.
            ConvertBacking.CopyTopLayer(source, target, ChunkSize, progress);
        }
        else
        {
            var copier = new ImageCopier(source, target, sparse, Math.Clamp(depth / 4, 1, 4), ChunkSize, targetKnownZero: !skipCreate || targetIsZero, progress, compress: o.Has("c"));
            copier.Run();
        }
        target.Flush();
        progress.Finish();
        return 0;
    }

    /// <summary>
    /// qemu-img's -l: "snapshot.id=ID", "snapshot.name=NAME" (or both, the id winning), or a bare id or
    /// name; the library looks an id up first, then a name.
    /// </summary>
    private static string SnapshotParam(string text)
    {
        if (!text.Contains('='))
        {
            return text;
        }
        string? id = null, name = null;
        foreach (var part in text.Split(','))
        {
            var eq = part.IndexOf('=');
            var (key, value) = eq < 0 ? (part, "") : (part[..eq], part[(eq + 1)..]);
            switch (key)
            {
                case "snapshot.id" or "id":
                    id = value;
                    break;
                case "snapshot.name" or "name":
                    name = value;
                    break;
                default:
                    throw new CliException($"Invalid parameter '{key}'");
            }
        }
        return id ?? name ?? throw new CliException("Failed in parsing snapshot param '" + text + "'");
    }
}
