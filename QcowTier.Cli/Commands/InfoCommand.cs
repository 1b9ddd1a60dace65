using QcowTier.Cli.Disks;
using QcowTier.Cli.Infrastructure;

namespace QcowTier.Cli.Commands;

/// <summary>qemu-img info.</summary>
internal sealed class InfoCommand : Command
{
    public override string Name => "info";

    public override string Synopsis => "info [-f fmt] [--output=human|json] [--backing-chain] [-U] filename";

    public override string Help => """
        Prints what the image is: format, virtual size, disk usage and, for qcow2, its features.
          -f fmt                  qcow2 or raw (default: detected from the file's magic)
          --output=human|json     qemu-img's text, or its JSON with the same field names
          --backing-chain         also every image of the backing chain, top first
          -U                      accepted for compatibility (images are opened read-only)

        """;

    public override int Run(IReadOnlyList<string> args, CliContext ctx)
    {
        var o = new OptionParser("f:U", ("output", true), ("backing-chain", false), ("force-share", false), ("image-opts", false)).Parse(args);
        if (o.WantsHelp)
        {
            return PrintHelp(ctx);
        }
        var json = ParseJsonOutput(o);
        if (o.Operands.Count != 1)
        {
            throw new CliException(o.Operands.Count == 0 ? "Expecting one image file name" : $"Unexpected argument: {o.Operands[1]}");
        }
        var path = o.Operands[0];
        if (o.Has("backing-chain"))
        {
            return InfoChain.Run(path, o.Get("f"), json, ctx, Describe, PrintHuman);
        }
        // As qemu-img info: the backing file is not opened (it may be missing), only named.
        using var disk = DiskOpener.Open(path, o.Get("f"), writable: false, noBacking: true);
        var info = Describe(disk);
        if (json)
        {
            ctx.Out.WriteLine(info.ToPrettyJson());
        }
        else
        {
            PrintHuman(disk, info, ctx.Out);
        }
        return 0;
    }

    private static QDict Describe(Disk disk)
    {
        var d = new QDict()
            .Add("virtual-size", disk.Size)
            .Add("filename", disk.FileName);
        QcowImageInfo? qi = (disk as QcowDisk)?.Image.GetInfo();
        if (qi is not null)
        {
            d.Add("cluster-size", (long)qi.ClusterSize);
        }
        InfoChain.AddBacking(disk, d);
        d.Add("format", disk.Format);
        if (qi is { SnapshotCount: > 0 })
        {
            d.Add("snapshots", SnapshotTable.Read(disk.FileName).Select(ToJson).ToList());
        }
        var actual = disk.AllocatedBytes;
        if (actual >= 0)
        {
            d.Add("actual-size", actual);
        }
        if (qi is not null)
        {
            var data = new QDict().Add("compat", qi.Compat);
            if (qi.Version >= 3)
            {
                data.Add("lazy-refcounts", qi.LazyRefcounts);
                data.Add("corrupt", qi.Corrupt);
            }
            data.Add("refcount-bits", (long)qi.RefcountBits);
            if (qi.DataFile is not null)
            {
                data.Add("data-file", qi.DataFile);
                data.Add("data-file-raw", qi.DataFileRaw);
            }
            if ((disk as QcowDisk)?.Image.GetBitmaps() is { Count: > 0 } bitmaps)
            {
                data.Add("bitmaps", bitmaps.Select(BitmapCommand.ToQDict).ToList<object>());
            }
            if (qi.Version >= 3)
            {
                data.Add("extended-l2", qi.ExtendedL2);
            }
            data.Add("compression-type", qi.CompressionType);
            if ((disk as QcowDisk)?.Image is { IsTiered: true } tiered)
            {
                // Beside QEMU's fields: the tiered layout's file, policy, bytes per tier and pins.
                var usage = tiered.GetTierUsage();
                data.Add("tier-data-file", tiered.TierDataFile ?? "");
                data.Add("tier-default", tiered.DefaultTier == StorageTier.Ssd ? "ssd" : "hdd");
                data.Add("ssd-budget", tiered.SsdBudget);
                data.Add("ssd-bytes", usage.SsdBytes);
                data.Add("hdd-bytes", usage.HddBytes);
                data.Add("tier-pins", string.Join(", ", tiered.GetTierPins().Select(p => $"[{p.Start}, +{p.Length}) {(p.Tier == StorageTier.Ssd ? "ssd" : "hdd")}")));
            }
            d.Add("format-specific", new QDict().Add("type", "qcow2").Add("data", data));
        }
        d.Add("dirty-flag", qi?.Dirty ?? false);
        return d;
    }

    private static object ToJson(SnapshotEntry s)
    {
        var d = new QDict()
            .Add("id", s.Id)
            .Add("name", s.Name)
            .Add("vm-state-size", s.VmStateSize)
            .Add("date-sec", (long)s.DateSec)
            .Add("date-nsec", (long)s.DateNsec)
            .Add("vm-clock-sec", (long)(s.VmClockNsec / 1_000_000_000))
            .Add("vm-clock-nsec", (long)(s.VmClockNsec % 1_000_000_000));
        if (s.Icount is { } icount)
        {
            d.Add("icount", (long)icount);
        }
        return d;
    }

    /// <summary>bdrv_snapshot_dump: one fixed-width line per snapshot, dates in local time.</summary>
    private static void PrintSnapshots(string path, TextWriter w)
    {
        w.WriteLine("Snapshot list:");
        w.WriteLine($"{"ID",-10}{"TAG",-17}{"VM SIZE",8}{"DATE",20}{"VM CLOCK",13}{"ICOUNT",11}");
        foreach (var s in SnapshotTable.Read(path))
        {
            var date = DateTimeOffset.FromUnixTimeSeconds(s.DateSec).ToLocalTime().ToString("yyyy-MM-dd HH:mm:ss", System.Globalization.CultureInfo.InvariantCulture);
            var secs = s.VmClockNsec / 1_000_000_000;
            var clock = $"{secs / 3600:00}:{secs / 60 % 60:00}:{secs % 60:00}.{s.VmClockNsec / 1_000_000 % 1000:000}";
            w.WriteLine($"{s.Id,-9} {s.Name,-16} {HumanUnits.SizeToStr(s.VmStateSize),8}{date,20}{clock,13}{s.Icount?.ToString(System.Globalization.CultureInfo.InvariantCulture) ?? "",11}");
        }
    }

    /// <summary>bdrv_image_info_dump.</summary>
    private static void PrintHuman(Disk disk, QDict info, TextWriter w)
    {
        var actual = disk.AllocatedBytes;
        w.WriteLine($"image: {disk.FileName}");
        w.WriteLine($"file format: {disk.Format}");
        w.WriteLine($"virtual size: {HumanUnits.SizeToStr(disk.Size)} ({disk.Size} bytes)");
        w.WriteLine($"disk size: {(actual >= 0 ? HumanUnits.SizeToStr(actual) : "unavailable")}");
        var members = info.InQemuOrder().ToDictionary(m => m.Key, m => m.Value);
        if (members.TryGetValue("cluster-size", out var cs))
        {
            w.WriteLine($"cluster_size: {cs}");
        }
        if (members.TryGetValue("dirty-flag", out var dirty) && dirty is true)
        {
            w.WriteLine("cleanly shut down: no");
        }
        InfoChain.PrintBacking(members, w);
        if (members.ContainsKey("snapshots"))
        {
            PrintSnapshots(disk.FileName, w);
        }
        if (members.TryGetValue("format-specific", out var spec) && spec is QDict specDict)
        {
            w.WriteLine("Format specific information:");
            var data = specDict.InQemuOrder().First(m => m.Key == "data").Value as QDict;
            foreach (var (key, value) in data!.InQemuOrder())
            {
                BitmapCommand.DumpHuman(key, value, 1, w);
            }
        }
    }
}
