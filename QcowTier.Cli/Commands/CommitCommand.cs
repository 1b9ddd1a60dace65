using QcowTier.Cli.Disks;
using QcowTier.Cli.Infrastructure;

namespace QcowTier.Cli.Commands;

/// <summary>qemu-img commit: write an overlay's clusters into its backing file, then empty it (unless -d).</summary>
internal sealed class CommitCommand : Command
{
    public override string Name => "commit";

    public override string Synopsis => "commit [-q] [-f fmt] [-t cache] [-b base] [-d] [-p] filename";

    public override string Help => """
        Writes what a qcow2 image allocates into its backing file (grown when smaller), then empties the
        image so that it reads everything from the backing file again.
          -b base    the backing file to commit into; only the image's own backing file is supported
          -d         keep the image's clusters (do not empty it)
          -f fmt     the image's format (qcow2)
          -t cache   cache mode (accepted; everything is flushed when done)
          -p, -q     progress (accepted), quiet

        """;

    public override int Run(IReadOnlyList<string> args, CliContext ctx)
    {
        var o = new OptionParser("hf:t:b:dpqr:", ("object", true), ("image-opts", false)).Parse(args);
        if (o.WantsHelp)
        {
            return PrintHelp(ctx);
        }
        if (o.Operands.Count != 1)
        {
            throw new CliException(o.Operands.Count == 0 ? "Expecting one image file name" : $"Unexpected argument: {o.Operands[1]}");
        }
        var path = o.Operands[0];
        if (o.Get("f") is { } f && f != "qcow2")
        {
            throw new CliException($"Could not open '{path}': commit needs a qcow2 image (got '{f}')");
        }
        using var disk = DiskOpener.Open(path, "qcow2", writable: true);
        var image = ((QcowDisk)disk).Image;
        var chain = image.GetBackingChain();
        if (chain.Count == 0)
        {
            throw new CliException("Image does not have a backing file");
        }
        if (o.Get("b") is { } b)
        {
            var wanted = Path.GetFullPath(b);
            var at = chain.ToList().FindIndex(l => Path.GetFullPath(l.FileName) == wanted);
            if (at < 0)
            {
                throw new CliException($"Did not find '{b}' in the backing chain of '{path}'");
            }
            if (at > 0)
            {
                throw new CliException($"Committing into '{b}' (depth {at + 1}) is not supported yet: only into the image's own backing file");
            }
        }
        image.Commit(keepTop: o.Has("d"));
        disk.Flush();
        if (!o.Has("q"))
        {
            ctx.Out.WriteLine("Image committed.");
        }
        return 0;
    }
}
