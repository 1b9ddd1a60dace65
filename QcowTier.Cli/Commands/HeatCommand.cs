using QcowTier.Cli.Infrastructure;

namespace QcowTier.Cli.Commands;

/// <summary>qcowtier heat: import traces into heat maps, show, merge, decay, report and render them.</summary>
internal sealed class HeatCommand : Command
{
    public override string Name => "heat";

    public override string Synopsis => "heat import|show|merge|decay|report|render [options] ...";

    public override string Help => """
        Heat maps: per-cluster read and write activity of a disk image (docs/FORMAT.md, section 3).
          heat import --format qemu-trace|blkparse|msr|fio|alibaba|bitmap TRACE --image FILE -o OUT.heat
                      [--device NAME] [--host NAME] [--bitmap NAME] [--unit-clusters N] [--half-life HOURS] [-p]
                              TRACE is the trace file; for --format bitmap, the qcow2 image holding the bitmap
          heat show [--top N] [--output=human|json] FILE.heat
                              hottest units first (json: start, length, reads, writes, score)
          heat merge -o OUT.heat IN.heat...
          heat decay [--to ISO-8601-TIME] FILE.heat
                              decay the counts to now (or the given moment), in place
          heat report [--output=human|json] FILE.heat
                              skew report: shares of the hottest 1/5/10/20 %, SSD needed for 50/90/99 % of reads
          heat render [--image FILE] [--curve] [--width N] -o OUT.png FILE.heat
                              heat along the disk (with each cluster's tier when --image is given),
                              or with --curve the SSD capacity against the share of I/O served

        """;

    public override int Run(IReadOnlyList<string> args, CliContext ctx)
    {
        if (args.Count == 0 || args[0] is "--help" or "-h")
        {
            return PrintHelp(ctx);
        }
        var sub = args[0];
        var o = new OptionParser("o:p", ("format", true), ("image", true), ("device", true), ("host", true), ("bitmap", true),
            ("unit-clusters", true), ("half-life", true), ("top", true), ("output", true), ("to", true), ("curve", false), ("width", true))
            .Parse(args.Skip(1).ToList());
        if (o.WantsHelp)
        {
            return PrintHelp(ctx);
        }
        var ops = o.Operands;
        switch (sub)
        {
            case "import":
                return Import(o, ctx);
            case "show":
                {
                    Need(ops, 1, "heat show FILE.heat");
                    var map = HeatMap.Load(ops[0]);
                    var top = o.Get("top") is { } t ? (int)SizeParser.Parse("top", t, 0, int.MaxValue) : int.MaxValue;
                    if (ParseJsonOutput(o))
                    {
                        ctx.Out.Flush();
                        using var ms = new MemoryStream();
                        HeatJson.Write(ms, map, top, indented: true);
                        ctx.Out.WriteLine(System.Text.Encoding.UTF8.GetString(ms.ToArray()));
                        return 0;
                    }
                    ctx.Out.WriteLine($"image {map.ImageId}, {map.VirtualSize} bytes, units of {map.UnitSize} bytes, half-life {map.HalfLife}");
                    ctx.Out.WriteLine($"window {map.WindowStart?.ToString("O") ?? "-"} .. {map.WindowEnd?.ToString("O") ?? "-"}, decayed to {map.DecayedAt:O}");
                    ctx.Out.WriteLine($"totals: {map.TotalReads} reads ({map.TotalReadBytes} bytes), {map.TotalWrites} writes ({map.TotalWriteBytes} bytes)");
                    ctx.Out.WriteLine($"{"start",16} {"length",10} {"reads",10} {"writes",10} {"score",12}");
                    foreach (var u in map.Hottest(top))
                    {
                        ctx.Out.WriteLine($"{u.Start,16} {u.Length,10} {u.Reads,10} {u.Writes,10} {u.Score,12:G6}");
                    }
                    return 0;
                }
            case "merge":
                {
                    var output = o.Get("o") ?? throw new CliException("heat merge needs -o OUT.heat");
                    if (ops.Count == 0)
                    {
                        throw new CliException("heat merge needs input heat maps");
                    }
                    var merged = HeatMap.Load(ops[0]);
                    foreach (var f in ops.Skip(1))
                    {
                        merged.Merge(HeatMap.Load(f, merged.ImageId));
                    }
                    merged.Save(output);
                    return 0;
                }
            case "decay":
                {
                    Need(ops, 1, "heat decay FILE.heat");
                    var map = HeatMap.Load(ops[0]);
                    var to = o.Get("to") is { } s
                        ? (DateTimeOffset.TryParse(s, System.Globalization.CultureInfo.InvariantCulture, System.Globalization.DateTimeStyles.AssumeUniversal, out var when) ? when : throw new CliException($"--to: '{s}' is not a time"))
                        : DateTimeOffset.UtcNow;
                    map.DecayTo(to);
                    map.Save(ops[0]);
                    return 0;
                }
            case "report":
                {
                    Need(ops, 1, "heat report FILE.heat");
                    var report = HeatAnalysis.Analyze(HeatMap.Load(ops[0]));
                    if (ParseJsonOutput(o))
                    {
                        ctx.Out.WriteLine(System.Text.Json.JsonSerializer.Serialize(new
                        {
                            verdict = report.Verdict.ToString(),
                            reason = report.VerdictReason,
                            top = report.Top.Select(t => new { fraction = t.ImageFraction, bytes = t.Bytes, reads = t.ReadShare, writes = t.WriteShare, io = t.IoShare }),
                            ssd_needed = report.SsdNeeded.Select(n => new { share = n.Share, bytes_for_reads = n.BytesForReads, bytes_for_io = n.BytesForIo }),
                        }, CliJson.Options));
                        return 0;
                    }
                    ctx.Out.WriteLine($"verdict: {report.Verdict} ({report.VerdictReason})");
                    foreach (var t in report.Top)
                    {
                        ctx.Out.WriteLine($"hottest {t.ImageFraction:P0} of the image ({HumanUnits.SizeToStr(t.Bytes)}): {t.ReadShare:P1} of reads, {t.WriteShare:P1} of writes");
                    }
                    foreach (var n in report.SsdNeeded)
                    {
                        ctx.Out.WriteLine($"SSD to serve {n.Share:P0} of reads: {HumanUnits.SizeToStr(n.BytesForReads)}; of all I/O: {HumanUnits.SizeToStr(n.BytesForIo)}");
                    }
                    return 0;
                }
            case "render":
                {
                    Need(ops, 1, "heat render -o OUT.png FILE.heat");
                    var output = o.Get("o") ?? throw new CliException("heat render needs -o OUT.png");
                    var map = HeatMap.Load(ops[0]);
                    var width = o.Get("width") is { } w ? (int)SizeParser.Parse("width", w, 64, 16384) : 1024;
                    using var fs = new FileStream(output, FileMode.Create, FileAccess.Write);
                    if (o.Has("curve"))
                    {
                        HeatRender.WriteCapacityCurve(fs, HeatAnalysis.Analyze(map), width, Math.Max(200, width * 5 / 8));
                    }
                    else if (o.Get("image") is { } imagePath)
                    {
                        using var image = QcowImage.Open(imagePath, new QcowOpenOptions { ReadOnly = true });
                        HeatRender.WriteHeatStrip(fs, map, image, width);
                    }
                    else
                    {
                        HeatRender.WriteHeatStrip(fs, map, placement: null, width);
                    }
                    return 0;
                }
            default:
                throw new CliException($"Unknown heat command '{sub}' (import, show, merge, decay, report, render)");
        }
    }

    private static int Import(ParsedOptions o, CliContext ctx)
    {
        var ops = o.Operands;
        Need(ops, 1, "heat import --format FMT TRACE --image FILE -o OUT.heat");
        var format = (o.Get("format") ?? throw new CliException("heat import needs --format")) switch
        {
            "qemu-trace" or "qemu" => HeatTraceFormat.QemuTrace,
            "blkparse" => HeatTraceFormat.Blkparse,
            "msr" => HeatTraceFormat.MsrCambridge,
            "fio" => HeatTraceFormat.FioIolog,
            "alibaba" => HeatTraceFormat.AlibabaBlock,
            "bitmap" => HeatTraceFormat.QemuDirtyBitmap,
            var f => throw new CliException($"Unknown trace format '{f}' (qemu-trace, blkparse, msr, fio, alibaba, bitmap)"),
        };
        var output = o.Get("o") ?? throw new CliException("heat import needs -o OUT.heat");
        var imagePath = o.Get("image") ?? (format == HeatTraceFormat.QemuDirtyBitmap ? ops[0] : throw new CliException("heat import needs --image FILE (the image the trace is of)"));
        HeatMap map;
        using (var image = QcowImage.Open(imagePath, new QcowOpenOptions { ReadOnly = !CanBind(imagePath) }))
        {
            var unitClusters = o.Get("unit-clusters") is { } uc ? (int)SizeParser.Parse("unit-clusters", uc, 1, 1 << 20) : 1;
            var halfLife = o.Get("half-life") is { } hl && double.TryParse(hl, System.Globalization.CultureInfo.InvariantCulture, out var hours) && hours > 0
                ? TimeSpan.FromHours(hours) : (TimeSpan?)null;
            map = File.Exists(output) ? HeatMap.Load(output, image.HeatIdentity) : new HeatMap(image.Size, image.ClusterSize, unitClusters, halfLife, image.HeatIdentity);
        }
        var bar = new Infrastructure.Progress(ctx, o.Has("p"));
        var length = new FileInfo(ops[0]).Length;
        var result = HeatImport.ImportFile(ops[0], format, map, new HeatImportOptions { Device = o.Get("device"), Host = o.Get("host"), BitmapName = o.Get("bitmap") },
            new SyncProgress<HeatImportProgress>(p => bar.Advance(100.0 * p.BytesRead / Math.Max(1, length))));
        bar.Finish();
        map.Save(output);
        ctx.Out.WriteLine($"imported {result.IosImported} I/Os ({result.ReadsImported} reads, {result.WritesImported} writes) from {result.LinesRead} lines"
            + (result.ImportedBackend is { } b ? $", backend {b}" : ""));
        if (result.MalformedLines > 0)
        {
            ctx.Out.WriteLine($"{result.MalformedLines} malformed line(s) skipped, e.g.:");
            foreach (var s in result.MalformedSamples)
            {
                ctx.Out.WriteLine($"  line {s.Line}: {s.Reason}: {s.Text}");
            }
        }
        if (result.IosOutsideDisk > 0)
        {
            ctx.Out.WriteLine($"{result.IosOutsideDisk} I/O(s) outside the disk ignored");
        }
        foreach (var w in result.Warnings)
        {
            ctx.Out.WriteLine("warning: " + w);
        }
        return 0;
    }

    /// <summary>Binding a plain image to a heat map adds an identity extension, which needs write access.</summary>
    private static bool CanBind(string path)
    {
        try
        {
            using var fs = new FileStream(path, FileMode.Open, FileAccess.ReadWrite, FileShare.ReadWrite);
            return true;
        }
        catch (UnauthorizedAccessException)
        {
            return false;
        }
    }

    private static void Need(List<string> ops, int n, string usage)
    {
        if (ops.Count != n)
        {
            throw new CliException($"usage: qcowtier {usage}");
        }
    }
}

/// <summary>JSON options for ad-hoc documents (reflection-based serialization is fine in the tool).</summary>
internal static class CliJson
{
    public static readonly System.Text.Json.JsonSerializerOptions Options = new() { WriteIndented = true };
}
