using QcowTier.Cli.Disks;
using QcowTier.Cli.Infrastructure;
using QcowTier.Cli.Io;

namespace QcowTier.Cli.Commands;

/// <summary>qemu-io: runs its commands (-c, repeatable, or lines on stdin) against one image.</summary>
internal sealed class IoCommand : Command
{
    public override string Name => "io";

    public override string Synopsis => "io [-f fmt] [-r] [-t cache] [-n] -c command [-c command ...] filename";

    public override string Help => """
        Runs qemu-io commands on the image, in order; without -c they are read from stdin.
          -c command   a command (repeat for more):
                         read  [-Cqv] [-P pattern [-s off] [-l len]] off len   (alias r)
                         write [-Cfquz] [-P pattern | -s source_file] off len  (alias w)
                         discard [-Cq] off len                                 (alias d)
                         flush                                                 (alias f)
                         length                                                (alias len)
                       offsets and lengths take k, M, G... suffixes; write's default pattern is 0xcd
          -f fmt       qcow2 or raw (default: detected)
          -r           open read-only
          -t cache     none, writeback, writethrough, directsync, unsafe
          -n           same as -t none
        Exit status: 1 when any command failed (a pattern mismatch included), else 0.

        """;

    public override int Run(IReadOnlyList<string> args, CliContext ctx)
    {
        var o = new OptionParser("c:f:rt:nUd:kT:m", ("image-opts", false), ("object", true), ("force-share", false), ("record-heat", true)).Parse(args);
        if (o.WantsHelp)
        {
            return PrintHelp(ctx);
        }
        var cache = o.Has("n") ? new CacheMode(true, false) : CacheMode.Parse(o.Get("t"), $"Invalid cache option: {o.Get("t")}");
        if (o.Operands.Count != 1)
        {
            throw new CliException(o.Operands.Count == 0 ? "Expecting one image file name" : $"Unexpected argument: {o.Operands[1]}");
        }
        var path = o.Operands[0];
        var readOnly = o.Has("r");
        Disk disk;
        try
        {
            disk = DiskOpener.Open(path, o.Get("f"), writable: !readOnly, cache);
        }
        catch (CliException e)
        {
            throw new CliException($"can't open device {path}: {e.Message}", e);
        }
        var failed = false;
        using (disk)
        {
            HeatMap? heat = null;
            var heatPath = o.Get("record-heat");
            if (heatPath is not null)
            {
                if (disk is not QcowDisk qd)
                {
                    throw new CliException("--record-heat needs a qcow2 image");
                }
                // Adds to an existing map of this image (refusing one of another image), or starts one.
                heat = File.Exists(heatPath)
                    ? HeatMap.Load(heatPath, qd.Image.HeatIdentity)
                    : new HeatMap(qd.Image.Size, qd.Image.ClusterSize, imageId: qd.Image.HeatIdentity);
                qd.Image.HeatRecorder = heat;
            }
            var shell = new QemuIoShell(disk, readOnly, ctx.Out, ctx.Err);
            var commands = o.GetAll("c").ToList();
            if (commands.Count > 0)
            {
                foreach (var c in commands)
                {
                    failed |= !shell.Execute(c);
                }
            }
            else
            {
                string? line;
                while ((line = Console.In.ReadLine()) is not null && line.Trim() is not ("quit" or "q"))
                {
                    failed |= !shell.Execute(line);
                }
            }
            ctx.Out.Flush();
            if (heat is not null)
            {
                ((QcowDisk)disk).Image.HeatRecorder = null;
                heat.Save(heatPath!);
            }
        }
        return failed ? 1 : 0;
    }
}
