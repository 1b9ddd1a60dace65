using QcowTier.Cli.Disks;
using QcowTier.Cli.Infrastructure;

namespace QcowTier.Cli.Commands;

/// <summary>qemu-img rebase: change the backing file, safely (the guest's view kept) or only in the header (-u).</summary>
internal sealed class RebaseCommand : Command
{
    public override string Name => "rebase";

    public override string Synopsis => "rebase [-q] [-f fmt] [-t cache] [-T src_cache] [-p] [-u] [-U] -b backing_file [-F backing_fmt] filename";

    public override string Help => """
        Changes the backing file of a qcow2 image.
          -b file    the new backing file, stored as given (relative to the image's folder); "" removes it
          -F fmt     its format, qcow2 or raw (required unless -b "")
          -u         unsafe: only rewrite the name (the old and new backing files must have the same
                     content); neither is opened. Without -u, every cluster the image does not allocate
                     whose content would change is first copied into the image
          -f fmt     the image's format (qcow2)
          -t, -T     cache modes (accepted; the image is flushed when done)
          -p, -q     progress, quiet (accepted)

        """;

    public override int Run(IReadOnlyList<string> args, CliContext ctx)
    {
        var o = new OptionParser("hf:F:b:upt:T:qU", ("object", true), ("image-opts", false), ("force-share", false)).Parse(args);
        if (o.WantsHelp)
        {
            return PrintHelp(ctx);
        }
        if (o.Operands.Count != 1)
        {
            throw new CliException(o.Operands.Count == 0 ? "Expecting one image file name" : $"Unexpected argument: {o.Operands[1]}");
        }
        var unsafeRebase = o.Has("u");
        var backing = o.Get("b");
        if (backing is null && !unsafeRebase)
        {
            throw new CliException("Must specify backing file (-b) or use unsafe mode (-u)");
        }
        backing ??= "";
        var format = o.Get("F");
        var path = o.Operands[0];
        if (!unsafeRebase && backing.Length > 0 && CreateBacking.Combine(path, backing) is var resolved && !File.Exists(resolved))
        {
            // As qemu-img: the new backing file is opened before anything else is checked.
            throw new CliException($"Could not open new backing file '{backing}': Could not open '{resolved}': No such file or directory");
        }
        if (backing.Length > 0 && format is null)
        {
            throw new CliException($"Could not change the backing file to '{backing}': backing format must be specified");
        }
        if (format is not (null or "qcow2" or "raw"))
        {
            throw new CliException($"Unknown driver '{format}' (qcowtier handles qcow2 and raw backing files)");
        }
        if (o.Get("f") is { } f && f != "qcow2")
        {
            throw new CliException($"Could not open '{path}': rebase needs a qcow2 image (got '{f}')");
        }
        using var disk = DiskOpener.Open(path, "qcow2", writable: true, noBacking: unsafeRebase);
        var image = ((QcowDisk)disk).Image;
        try
        {
            image.Rebase(backing.Length == 0 ? null : backing, format, unsafeRebase);
        }
        catch (QcowBackingFileException e) when (backing.Length > 0)
        {
            var why = e.Message.Replace("Could not open backing file: ", "", StringComparison.Ordinal);
            var colon = why.IndexOf(": ", StringComparison.Ordinal);
            // The library names the image first; qemu-img names only the new backing file.
            if (e.Reason != QcowBackingError.NotFound && colon >= 0 && why.StartsWith(path, StringComparison.Ordinal))
            {
                why = why[(colon + 2)..];
            }
            throw new CliException($"Could not open new backing file '{backing}': {why}", e);
        }
        disk.Flush();
        return 0;
    }
}
