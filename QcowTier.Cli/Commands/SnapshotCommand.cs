using QcowTier.Cli.Disks;
using QcowTier.Cli.Infrastructure;

namespace QcowTier.Cli.Commands;

/// <summary>qemu-img snapshot: list, create, apply and delete internal snapshots.</summary>
internal sealed class SnapshotCommand : Command
{
    public override string Name => "snapshot";

    public override string Synopsis => "snapshot [-U] [-q] [-l | -a snapshot | -c snapshot | -d snapshot] filename";

    public override string Help => """
        Lists, creates, applies (reverts the disk to) or deletes internal snapshots of a qcow2 image.
          -l              list the snapshots
          -c snapshot     create a snapshot named 'snapshot' (names are unique)
          -a snapshot     apply: the disk becomes the snapshot's content (by id, else by name)
          -d snapshot     delete the snapshot named 'snapshot'
          -q              quiet
          -U              open without QEMU's image locks (with -l)
        Snapshots of tiered images are not supported.

        """;

    public override int Run(IReadOnlyList<string> args, CliContext ctx)
    {
        var o = new OptionParser("la:c:d:qUhf:", ("force-share", false), ("image-opts", false), ("object", true), ("help", false)).Parse(args);
        if (o.WantsHelp)
        {
            return PrintHelp(ctx);
        }
        var actions = o.Options.Where(x => x.Key is "l" or "a" or "c" or "d").ToList();
        if (actions.Select(x => x.Key).Distinct().Count() > 1)
        {
            throw new CliException("Cannot mix '-l', '-a', '-c', '-d'");
        }
        if (o.Operands.Count != 1)
        {
            throw new CliException(o.Operands.Count == 0 ? "Expecting one image file name" : $"Unexpected argument: {o.Operands[1]}");
        }
        var path = o.Operands[0];
        if (actions.Count == 0)
        {
            return 0; // as qemu-img: no action, nothing to do
        }
        var (action, snapshot) = actions[^1];
        using var disk = DiskOpener.Open(path, o.Get("f"), writable: action != "l");
        if (disk is not QcowDisk q)
        {
            if (action == "l")
            {
                return 0; // raw images have no snapshots
            }
            throw new CliException($"Could not {Verb(action)} snapshot '{snapshot}': -95 (Operation not supported)");
        }
        var image = q.Image;
        try
        {
            switch (action)
            {
                case "l":
                    PrintList(image.GetSnapshots(), ctx.Out);
                    break;
                case "c":
                    image.CreateSnapshot(snapshot!);
                    break;
                case "a":
                    image.ApplySnapshot(snapshot!);
                    break;
                default:
                    // qemu-img snapshot -d matches names only.
                    var byName = image.GetSnapshots().FirstOrDefault(s => s.Name == snapshot)
                        ?? throw new QcowSnapshotNotFoundException("snapshot not found");
                    image.DeleteSnapshot(byName.Id);
                    break;
            }
            disk.Flush();
        }
        catch (QcowSnapshotNotFoundException) when (action is "a")
        {
            throw new CliException($"Could not apply snapshot '{snapshot}': Failed to load snapshot: No such file or directory");
        }
        catch (QcowSnapshotNotFoundException) when (action is "d")
        {
            throw new CliException($"Could not delete snapshot '{snapshot}': snapshot not found");
        }
        catch (Exception e) when (action is not "l" && e is IOException or ArgumentException or InvalidOperationException or NotSupportedException)
        {
            throw new CliException($"Could not {Verb(action)} snapshot '{snapshot}': {e.Message}", e);
        }
        return 0;
    }

    private static string Verb(string action) => action switch
    {
        "c" => "create",
        "a" => "apply",
        _ => "delete",
    };

    /// <summary>bdrv_snapshot_dump: a header and one fixed-width line per snapshot, dates in local time; nothing when there are none.</summary>
    internal static void PrintList(IReadOnlyList<QcowSnapshotInfo> snapshots, TextWriter w)
    {
        if (snapshots.Count == 0)
        {
            return;
        }
        w.WriteLine("Snapshot list:");
        w.WriteLine($"{"ID",-10}{"TAG",-17}{"VM SIZE",8}{"DATE",20}{"VM CLOCK",13}{"ICOUNT",11}");
        foreach (var s in snapshots)
        {
            var date = DateTimeOffset.FromUnixTimeSeconds(s.DateSeconds).ToLocalTime().ToString("yyyy-MM-dd HH:mm:ss", System.Globalization.CultureInfo.InvariantCulture);
            var ns = s.VmClockNanoseconds;
            var secs = ns / 1_000_000_000;
            var clock = $"{secs / 3600:00}:{secs / 60 % 60:00}:{secs % 60:00}.{ns / 1_000_000 % 1000:000}";
            w.WriteLine($"{s.Id,-9} {s.Name,-16} {HumanUnits.SizeToStr(s.VmStateSize),8}{date,20}{clock,13}{s.Icount?.ToString(System.Globalization.CultureInfo.InvariantCulture) ?? "",11}");
        }
    }
}
