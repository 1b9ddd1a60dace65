using System.Text;
using System.Text.Json;
using QcowTier.Cli.Infrastructure;

namespace QcowTier.Cli.Commands;

/// <summary>qcowtier rebalance plan|apply: move hot clusters to SSD and cold ones to HDD from heat maps.</summary>
internal sealed class RebalanceCommand : Command
{
    public override string Name => "rebalance";

    public override string Synopsis => "rebalance plan|apply FILE... --heat H... --ssd-budget SIZE|PCT% [--max-move SIZE] [--throttle RATE] [--shared] [--output=human|json] [-p]";

    public override string Help => """
        Plans (and with 'apply' performs) cluster moves between the SSD and HDD tiers of stopped VMs' images.
          FILE...             tiered images; one --heat map per image, in the same order
          --heat H            heat map file (qcowtier heat import / --record-heat)
          --ssd-budget B      bytes of SSD per image (k, M, G suffixes) or a percentage of each image ("10%")
          --shared            one budget for all the images together, hottest data first
          --max-move SIZE     cap on bytes moved in this run
          --throttle RATE     cap on copy throughput, bytes per second (k, M, G suffixes)
          --hysteresis F      promote only when F times hotter than the resident it displaces (default 1.5)
          --read-weight W, --write-weight W   weights of reads and writes in the heat score
          --sequential-run SIZE   units read mostly in sequential runs at least this long are ranked by
                              their random I/O only, so long scans stay on HDD (e.g. 8M)
          --ssd-model LAT,RATE, --hdd-model LAT,RATE   device model of a tier for the predictions, e.g.
                              0.1ms,500M and 8ms,150M (the defaults)
          --output=json       the plan (and result) as JSON
          --picture PREFIX    PREFIX-N.png per image: its heat strip over its tiers before and after
                              (after as planned for 'plan', as applied for 'apply')
          -p                  progress bar (apply)

        """;

    public override int Run(IReadOnlyList<string> args, CliContext ctx)
    {
        if (args.Count == 0 || args[0] is "--help" or "-h")
        {
            return PrintHelp(ctx);
        }
        var sub = args[0];
        if (sub is not ("plan" or "apply"))
        {
            throw new CliException($"Unknown rebalance command '{sub}' (plan or apply)");
        }
        var o = new OptionParser("p", ("heat", true), ("ssd-budget", true), ("max-move", true), ("throttle", true), ("shared", false),
            ("output", true), ("hysteresis", true), ("read-weight", true), ("write-weight", true), ("picture", true),
            ("sequential-run", true), ("ssd-model", true), ("hdd-model", true)).Parse(args.Skip(1).ToList());
        if (o.WantsHelp)
        {
            return PrintHelp(ctx);
        }
        var files = o.Operands;
        var heats = o.GetAll("heat").ToList();
        if (files.Count == 0)
        {
            throw new CliException("Expecting image file name(s)");
        }
        if (heats.Count != files.Count)
        {
            throw new CliException($"give one --heat map per image ({files.Count} image(s), {heats.Count} map(s))");
        }
        var budgetText = o.Get("ssd-budget") ?? throw new CliException("--ssd-budget SIZE|PCT% is required");
        long? budgetBytes = null;
        double? budgetPct = null;
        if (budgetText.EndsWith('%'))
        {
            budgetPct = double.TryParse(budgetText[..^1], System.Globalization.CultureInfo.InvariantCulture, out var pct) && pct is >= 0 and <= 100
                ? pct : throw new CliException($"--ssd-budget: '{budgetText}' is not a percentage between 0 and 100");
        }
        else
        {
            budgetBytes = SizeParser.Parse("ssd-budget", budgetText);
        }
        var policy = new RebalancePolicy
        {
            SsdBudgetBytes = budgetBytes,
            SsdBudgetPercent = budgetPct,
            SharedBudget = o.Has("shared"),
            MaxMoveBytes = o.Get("max-move") is { } m ? SizeParser.Parse("max-move", m) : null,
            ThrottleBytesPerSecond = o.Get("throttle") is { } t ? SizeParser.Parse("throttle", t) : null,
            Hysteresis = o.Get("hysteresis") is { } h ? ParseDouble("hysteresis", h) : 1.5,
            ReadWeight = o.Get("read-weight") is { } rw ? ParseDouble("read-weight", rw) : 1,
            WriteWeight = o.Get("write-weight") is { } ww ? ParseDouble("write-weight", ww) : 1,
            SequentialRunBytes = o.Get("sequential-run") is { } sr ? SizeParser.Parse("sequential-run", sr) : null,
            Ssd = o.Get("ssd-model") is { } sm ? ParseModel("ssd-model", sm) : DeviceModel.Ssd,
            Hdd = o.Get("hdd-model") is { } hm ? ParseModel("hdd-model", hm) : DeviceModel.Hdd,
        };
        var json = ParseJsonOutput(o);
        var apply = sub == "apply";
        var images = new List<QcowImage>();
        try
        {
            foreach (var f in files)
            {
                // An apply opens read-write: the image must not be in use by a VM (QEMU's lock refuses it).
                images.Add(QcowImage.Open(f, new QcowOpenOptions { ReadOnly = !apply }));
            }
            var inputs = new List<RebalanceInput>();
            for (var i = 0; i < files.Count; i++)
            {
                var heat = HeatMap.Load(heats[i], images[i].HeatIdentity);
                inputs.Add(new RebalanceInput(images[i], heat));
            }
            var plan = Rebalancer.Plan(inputs, policy);
            var picture = o.Get("picture");
            var placementsBefore = images.Select(i => i.GetPlacement()).ToList();
            RebalanceResult? result = null;
            if (apply)
            {
                var bar = new Infrastructure.Progress(ctx, o.Has("p"));
                using var cancel = new CancellationTokenSource();
                ConsoleCancelEventHandler onCancel = (_, e) =>
                {
                    e.Cancel = true; // stop between batches; the image stays consistent
                    cancel.Cancel();
                };
                Console.CancelKeyPress += onCancel;
                try
                {
                    result = Rebalancer.Apply(plan, images, new SyncProgress<RebalanceProgress>(p => bar.Advance(100.0 * p.BytesDone / Math.Max(1, p.BytesTotal))), cancel.Token);
                }
                finally
                {
                    Console.CancelKeyPress -= onCancel;
                }
                bar.Finish();
            }
            Pictures(picture, inputs, placementsBefore, i => result is null ? plan.ProjectPlacement(i, placementsBefore[i]) : images[i].GetPlacement());
            if (json)
            {
                ctx.Out.WriteLine(ToJson(plan, result, files));
            }
            else
            {
                ctx.Out.Write(plan.Explain());
                foreach (var move in plan.Moves)
                {
                    ctx.Out.WriteLine($"  {files[move.Image]}: [{move.Start}, +{move.Length}) {HumanUnits.SizeToStr(move.Bytes)} -> {TierCommand.TierName(move.To)}  ({move.Reason})");
                }
                if (result is not null)
                {
                    ctx.Out.WriteLine($"Applied {result.MovesApplied} of {plan.Moves.Count} moves, {HumanUnits.SizeToStr(result.BytesMoved)} in {result.Elapsed.TotalSeconds:F2} s{(result.Cancelled ? " (cancelled; run again to continue)" : "")}.");
                }
            }
            return result?.Cancelled == true ? 1 : 0;
        }
        finally
        {
            foreach (var img in images)
            {
                img.Dispose();
            }
        }
    }

    private static void Pictures(string? prefix, List<RebalanceInput> inputs, List<IReadOnlyList<TierExtent>> before, Func<int, IReadOnlyList<TierExtent>> after)
    {
        if (prefix is null)
        {
            return;
        }
        for (var i = 0; i < inputs.Count; i++)
        {
            using var fs = new FileStream($"{prefix}-{i}.png", FileMode.Create, FileAccess.Write);
            HeatRender.WriteRebalancePicture(fs, inputs[i].Heat, before[i], after(i));
        }
    }

    /// <summary>"LATENCY,RATE": a latency with its unit (ns, us, ms, s) and a bandwidth in bytes per second (k, M, G suffixes).</summary>
    private static DeviceModel ParseModel(string name, string text)
    {
        var parts = text.Split(',');
        if (parts.Length != 2)
        {
            throw new CliException($"--{name}: '{text}' is not LATENCY,RATE (e.g. 8ms,150M)");
        }
        var lat = parts[0].Trim();
        var (number, scale) = lat switch
        {
            _ when lat.EndsWith("ns", StringComparison.Ordinal) => (lat[..^2], 1e-9),
            _ when lat.EndsWith("us", StringComparison.Ordinal) => (lat[..^2], 1e-6),
            _ when lat.EndsWith("ms", StringComparison.Ordinal) => (lat[..^2], 1e-3),
            _ when lat.EndsWith('s') => (lat[..^1], 1.0),
            _ => throw new CliException($"--{name}: latency '{lat}' needs a unit (ns, us, ms or s)"),
        };
        var seconds = ParseDouble(name, number) * scale;
        var rate = SizeParser.Parse(name, parts[1].Trim());
        if (rate <= 0 || seconds > 3600)
        {
            throw new CliException($"--{name}: '{text}' is out of range");
        }
        return new DeviceModel(TimeSpan.FromSeconds(seconds), rate);
    }

    private static double ParseDouble(string name, string s)
        => double.TryParse(s, System.Globalization.CultureInfo.InvariantCulture, out var v) && v >= 0
            ? v : throw new CliException($"--{name}: '{s}' is not a non-negative number");

    private static string ToJson(RebalancePlan plan, RebalanceResult? result, List<string> files)
    {
        var ms = new MemoryStream();
        using (var w = new Utf8JsonWriter(ms, new JsonWriterOptions { Indented = true }))
        {
            w.WriteStartObject();
            w.WriteBoolean("worth-acting", plan.WorthActing);
            w.WriteNumber("hottest-20-share", plan.Hottest20Share);
            w.WriteNumber("ssd-budget", plan.SsdBudget);
            Prediction(w, "before", plan.Before);
            Prediction(w, "after", plan.After);
            w.WriteNumber("bytes-to-ssd", plan.BytesToSsd);
            w.WriteNumber("bytes-to-hdd", plan.BytesToHdd);
            w.WriteNumber("estimated-seconds", plan.EstimatedDuration.TotalSeconds);
            w.WriteStartArray("moves");
            foreach (var m in plan.Moves)
            {
                w.WriteStartObject();
                w.WriteString("image", files[m.Image]);
                w.WriteNumber("start", m.Start);
                w.WriteNumber("length", m.Length);
                w.WriteNumber("bytes", m.Bytes);
                w.WriteString("to", TierCommand.TierName(m.To));
                w.WriteNumber("score", m.Score);
                w.WriteNumber("rank", m.Rank);
                w.WriteNumber("cost-seconds", m.Cost.TotalSeconds);
                w.WriteNumber("benefit-seconds", m.Benefit.TotalSeconds);
                w.WriteString("reason", m.Reason);
                w.WriteEndObject();
            }
            w.WriteEndArray();
            w.WriteStartArray("notes");
            foreach (var n in plan.Notes)
            {
                w.WriteStringValue(n);
            }
            w.WriteEndArray();
            if (result is not null)
            {
                w.WriteStartObject("result");
                w.WriteNumber("moves-applied", result.MovesApplied);
                w.WriteNumber("bytes-moved", result.BytesMoved);
                w.WriteNumber("seconds", result.Elapsed.TotalSeconds);
                w.WriteBoolean("cancelled", result.Cancelled);
                w.WriteEndObject();
            }
            w.WriteEndObject();
        }
        return Encoding.UTF8.GetString(ms.ToArray());
    }

    private static void Prediction(Utf8JsonWriter w, string name, PlacementPrediction p)
    {
        w.WriteStartObject(name);
        w.WriteNumber("read-share", p.ReadShare);
        w.WriteNumber("write-share", p.WriteShare);
        w.WriteNumber("ssd-bytes", p.SsdBytes);
        w.WriteNumber("mean-read-latency-ms", p.MeanReadLatency.TotalMilliseconds);
        w.WriteEndObject();
    }
}
