using QcowTier.Cli.Disks;
using QcowTier.Cli.Infrastructure;

namespace QcowTier.Cli.Commands;

/// <summary>qemu-img check: exit 0 clean, 1 check failed, 2 corruptions, 3 leaks only, 63 format without checks.</summary>
internal sealed class CheckCommand : Command
{
    private const string RepairedBanner = "The following inconsistencies were found and repaired:";

    public override string Name => "check";

    public override string Synopsis => "check [-q] [-f fmt] [--output=human|json] [-r [leaks | all]] [-T src_cache] [-U] filename";

    public override string Help => """
        Checks the image's metadata for consistency, optionally repairing it.
          -f fmt                  qcow2 or raw (default: detected)
          -r leaks|all            repair leaked clusters only, or everything that can be repaired
          --output=human|json     qemu-img's text or JSON (same field names)
          -q                      quiet
          -T cache                cache mode for the image (none, writeback, ...)
        Exit status: 0 clean, 1 check failed, 2 corruptions left, 3 leaks left, 63 no check for the format.

        """;

    public override int Run(IReadOnlyList<string> args, CliContext ctx)
    {
        var o = new OptionParser("f:r:T:qU", ("output", true), ("image-opts", false), ("force-share", false)).Parse(args);
        if (o.WantsHelp)
        {
            return PrintHelp(ctx);
        }
        var json = ParseJsonOutput(o);
        var quiet = o.Has("q");
        var repair = o.Get("r") switch
        {
            null => QcowRepairMode.None,
            "leaks" => QcowRepairMode.Leaks,
            "all" => QcowRepairMode.All,
            var other => throw new CliException($"Unknown option value for -r (expecting 'leaks' or 'all'): {other}"),
        };
        var cache = CacheMode.Parse(o.Get("T"), $"Invalid source cache option: {o.Get("T")}");
        if (o.Operands.Count != 1)
        {
            throw new CliException(o.Operands.Count == 0 ? "Expecting one image file name" : $"Unexpected argument: {o.Operands[1]}");
        }
        var path = o.Operands[0];
        using var disk = DiskOpener.Open(path, o.Get("f"), writable: repair != QcowRepairMode.None, cache);
        if (disk is not QcowDisk qcow)
        {
            throw new CliException("This image format does not support checks", 63);
        }
        QcowCheckResult result;
        try
        {
            result = qcow.Image.Check(repair);
        }
        catch (Exception e) when (e is IOException or InvalidOperationException or NotSupportedException)
        {
            throw new CliException($"Check failed: {e.Message}");
        }
        PrintMessages(result, json, quiet, ctx);
        if (json)
        {
            ctx.Out.WriteLine(ToJson(result, disk).ToPrettyJson());
        }
        else if (!quiet)
        {
            PrintHuman(result, ctx.Out);
        }
        if (result.CheckErrors > 0)
        {
            throw new CliException("Check failed", 1);
        }
        return result.ExitCode;
    }

    /// <summary>
    /// The checker's per-problem lines go to stderr as in qemu-img; the repair summary in the middle of
    /// them is qemu-img's stdout, printed only for human output.
    /// </summary>
    private static void PrintMessages(QcowCheckResult r, bool json, bool quiet, CliContext ctx)
    {
        var messages = r.Messages;
        var banner = -1;
        for (var i = 0; i < messages.Count; i++)
        {
            if (messages[i] == RepairedBanner)
            {
                banner = i;
                break;
            }
        }
        var before = banner >= 0 ? messages.Take(banner) : messages;
        var after = banner >= 0 ? messages.Skip(banner).SkipWhile(IsBannerLine) : [];
        foreach (var m in before)
        {
            ctx.Err.WriteLine(m);
        }
        ctx.Err.Flush();
        if ((r.LeaksFixed > 0 || r.CorruptionsFixed > 0) && !json && !quiet)
        {
            ctx.Out.WriteLine(RepairedBanner);
            ctx.Out.WriteLine();
            ctx.Out.WriteLine($"    {r.LeaksFixed} leaked clusters");
            ctx.Out.WriteLine($"    {r.CorruptionsFixed} corruptions");
            ctx.Out.WriteLine();
            ctx.Out.WriteLine("Double checking the fixed image now...");
            ctx.Out.Flush();
        }
        foreach (var m in after)
        {
            ctx.Err.WriteLine(m);
        }
        ctx.Err.Flush();
    }

    private static bool IsBannerLine(string line)
        => line.Length == 0 || line == RepairedBanner || line == "Double checking the fixed image now..."
           || (line.StartsWith("    ", StringComparison.Ordinal) && (line.EndsWith(" leaked clusters", StringComparison.Ordinal) || line.EndsWith(" corruptions", StringComparison.Ordinal)));

    /// <summary>collect_image_check: zero-valued optional fields are left out.</summary>
    private static QDict ToJson(QcowCheckResult r, Disk disk)
    {
        var d = new QDict()
            .Add("filename", disk.FileName)
            .Add("format", disk.Format)
            .Add("check-errors", (long)r.CheckErrors);
        AddNonZero(d, "image-end-offset", r.ImageEndOffset);
        AddNonZero(d, "corruptions", r.Corruptions);
        AddNonZero(d, "leaks", r.Leaks);
        AddNonZero(d, "corruptions-fixed", r.CorruptionsFixed);
        AddNonZero(d, "leaks-fixed", r.LeaksFixed);
        AddNonZero(d, "total-clusters", r.TotalClusters);
        AddNonZero(d, "allocated-clusters", r.AllocatedClusters);
        AddNonZero(d, "fragmented-clusters", r.FragmentedClusters);
        AddNonZero(d, "compressed-clusters", r.CompressedClusters);
        return d;
    }

    private static void AddNonZero(QDict d, string key, long value)
    {
        if (value != 0)
        {
            d.Add(key, value);
        }
    }

    /// <summary>dump_human_image_check.</summary>
    private static void PrintHuman(QcowCheckResult r, TextWriter w)
    {
        if (r.Corruptions == 0 && r.Leaks == 0 && r.CheckErrors == 0)
        {
            w.WriteLine("No errors were found on the image.");
        }
        else
        {
            if (r.Corruptions > 0)
            {
                w.WriteLine();
                w.WriteLine($"{r.Corruptions} errors were found on the image.");
                w.WriteLine("Data may be corrupted, or further writes to the image may corrupt it.");
            }
            if (r.Leaks > 0)
            {
                w.WriteLine();
                w.WriteLine($"{r.Leaks} leaked clusters were found on the image.");
                w.WriteLine("This means waste of disk space, but no harm to data.");
            }
            if (r.CheckErrors > 0)
            {
                w.WriteLine();
                w.WriteLine($"{r.CheckErrors} internal errors have occurred during the check.");
            }
        }
        if (r.TotalClusters != 0 && r.AllocatedClusters != 0)
        {
            w.WriteLine($"{r.AllocatedClusters}/{r.TotalClusters} = {CFormat.Fixed(r.AllocatedClusters * 100.0 / r.TotalClusters, 2)}% allocated, "
                + $"{CFormat.Fixed(r.FragmentedClusters * 100.0 / r.AllocatedClusters, 2)}% fragmented, "
                + $"{CFormat.Fixed(r.CompressedClusters * 100.0 / r.AllocatedClusters, 2)}% compressed clusters");
        }
        if (r.ImageEndOffset != 0)
        {
            w.WriteLine($"Image end offset: {r.ImageEndOffset}");
        }
    }
}
