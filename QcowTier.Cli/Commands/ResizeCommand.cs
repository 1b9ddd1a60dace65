using QcowTier.Cli.Disks;
using QcowTier.Cli.Infrastructure;

namespace QcowTier.Cli.Commands;

/// <summary>qemu-img resize.</summary>
internal sealed class ResizeCommand : Command
{
    public override string Name => "resize";

    public override string Synopsis => "resize [-f fmt] [-q] [--shrink] filename [+ | -]size";

    public override string Help => """
        Changes the virtual size. "+size" grows by, "-size" shrinks by, a plain size sets the size.
          -f fmt      qcow2 or raw (default: detected)
          --shrink    allow shrinking (the data past the new end is deleted)
          --preallocation=off|metadata|falloc|full
                      preallocate the new part of a growing image
          -q          quiet

        """;

    public override int Run(IReadOnlyList<string> args, CliContext ctx)
    {
        if (args.Any(a => a is "--help" or "-h"))
        {
            return PrintHelp(ctx);
        }
        // As qemu-img: the size is always the last word, taken out before option parsing so that a
        // negative size is not read as an option.
        if (args.Count < 2)
        {
            throw new CliException("Not enough arguments");
        }
        var sizeText = args[^1];
        var o = new OptionParser("f:qU", ("shrink", false), ("preallocation", true), ("image-opts", false), ("object", true)).Parse(args.Take(args.Count - 1).ToList());
        if (o.Operands.Count != 1)
        {
            throw new CliException(o.Operands.Count == 0 ? "Expecting image file name" : $"Unexpected argument: {o.Operands[1]}");
        }
        var prealloc = o.Get("preallocation") switch
        {
            null or "off" => QcowPreallocation.Off,
            "metadata" => QcowPreallocation.Metadata,
            "falloc" => QcowPreallocation.Falloc,
            "full" => QcowPreallocation.Full,
            var other => throw new CliException($"Invalid preallocation mode '{other}'"),
        };
        var relative = sizeText.Length > 0 && sizeText[0] is '+' or '-' ? sizeText[0] : '\0';
        var number = relative != '\0' ? sizeText[1..] : sizeText;
        if (SizeParser.TryParse(number, out var n) != SizeParser.Outcome.Ok || n > long.MaxValue)
        {
            throw new CliException("Parameter 'size' expects a non-negative number below 2^64");
        }
        var path = o.Operands[0];
        using var disk = DiskOpener.Open(path, o.Get("f"), writable: true);
        var current = disk.Size;
        var newSize = relative switch
        {
            '+' => current + (long)n,
            '-' => current - (long)n,
            _ => (long)n,
        };
        if (newSize <= 0)
        {
            throw new CliException("New image size must be positive");
        }
        if (disk is QcowDisk && newSize % 512 != 0)
        {
            throw new CliException("The new size must be a multiple of 512");
        }
        if (newSize < current)
        {
            if (!o.Has("shrink"))
            {
                throw new CliException("Use the --shrink option to perform a shrink operation.");
            }
            if (prealloc != QcowPreallocation.Off)
            {
                throw new CliException("Preallocation can only be used for growing images");
            }
        }
        if (prealloc != QcowPreallocation.Off && disk is not QcowDisk)
        {
            throw new CliException($"--preallocation={o.Get("preallocation")} is not supported yet for raw files");
        }
        try
        {
            if (disk is QcowDisk q)
            {
                q.Image.Resize(newSize, prealloc);
            }
            else
            {
                disk.Resize(newSize);
            }
            disk.Flush();
        }
        catch (Exception e) when (e is IOException or ArgumentException or NotSupportedException or InvalidOperationException)
        {
            throw new CliException($"Error resizing image: {e.Message}", e);
        }
        if (!o.Has("q"))
        {
            ctx.Out.WriteLine("Image resized.");
        }
        return 0;
    }
}
