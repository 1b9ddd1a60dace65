using System.Text.Json;
using QcowTier.Cli.Infrastructure;

namespace QcowTier.Cli.Commands;

/// <summary>qcowtier tier: attach, detach, export, pin, unpin, status and move for the tiered layout.</summary>
internal sealed class TierCommand : Command
{
    public override string Name => "tier";

    public override string Synopsis => "tier attach|detach|export|pin|unpin|status|move [options] FILE ...";

    public override string Help => """
        Manages the tiered layout (docs/FORMAT.md): clusters on the image file (SSD) or an HDD data file.
          tier attach [--default-tier ssd|hdd] [--ssd-budget SIZE] FILE HDD_FILE
                              turn a plain qcow2 image into a tiered one, in place
          tier detach [--keep-data-file] FILE
                              move every cluster back and remove the layout, so QEMU opens it again
          tier export [-O qcow2|raw] FILE OUTPUT
                              copy the virtual disk into a new plain image for stock QEMU
          tier pin FILE OFFSET LENGTH ssd|hdd
          tier unpin FILE OFFSET LENGTH
          tier status [--output=human|json] FILE
                              bytes per tier, pins and policy
          tier move --to ssd|hdd [-p] FILE OFFSET LENGTH
                              move the allocated clusters of a guest range (crash-safe)
          tier policy [--default-tier ssd|hdd] [--ssd-budget SIZE] FILE
        Sizes and offsets take k, M, G, T suffixes.

        """;

    public override int Run(IReadOnlyList<string> args, CliContext ctx)
    {
        if (args.Count == 0 || args[0] is "--help" or "-h")
        {
            return PrintHelp(ctx);
        }
        var sub = args[0];
        var rest = args.Skip(1).ToList();
        var o = new OptionParser("pO:", ("default-tier", true), ("ssd-budget", true), ("keep-data-file", false), ("output", true), ("to", true)).Parse(rest);
        if (o.WantsHelp)
        {
            return PrintHelp(ctx);
        }
        var ops = o.Operands;
        switch (sub)
        {
            case "attach":
                {
                    Need(ops, 2, "tier attach FILE HDD_FILE");
                    using var image = QcowImage.Open(ops[0]);
                    image.AttachTier(new QcowTierOptions
                    {
                        DataFile = ops[1],
                        DefaultTier = ParseTier(o.Get("default-tier") ?? "ssd"),
                        SsdBudget = o.Get("ssd-budget") is { } b ? SizeParser.Parse("ssd-budget", b) : 0,
                    });
                    ctx.Out.WriteLine($"Attached tier data file '{image.TierDataFile}'.");
                    return 0;
                }
            case "detach":
                {
                    Need(ops, 1, "tier detach FILE");
                    using var image = QcowImage.Open(ops[0]);
                    var hdd = image.TierDataFile;
                    image.DetachTier(deleteDataFile: !o.Has("keep-data-file"));
                    ctx.Out.WriteLine($"Detached; every cluster is in '{ops[0]}'{(o.Has("keep-data-file") ? "" : $" and '{hdd}' was deleted")}.");
                    return 0;
                }
            case "export":
                {
                    Need(ops, 2, "tier export FILE OUTPUT");
                    var fmt = o.Get("O") ?? "qcow2";
                    if (fmt is not ("qcow2" or "raw"))
                    {
                        throw new CliException($"Unknown output format '{fmt}' (qcow2 or raw)");
                    }
                    using var image = QcowImage.Open(ops[0], new QcowOpenOptions { ReadOnly = true });
                    image.ExportTo(ops[1], raw: fmt == "raw");
                    return 0;
                }
            case "pin":
                {
                    Need(ops, 4, "tier pin FILE OFFSET LENGTH ssd|hdd");
                    using var image = QcowImage.Open(ops[0]);
                    image.PinTier(SizeParser.Parse("offset", ops[1]), SizeParser.Parse("length", ops[2]), ParseTier(ops[3]));
                    return 0;
                }
            case "unpin":
                {
                    Need(ops, 3, "tier unpin FILE OFFSET LENGTH");
                    using var image = QcowImage.Open(ops[0]);
                    image.UnpinTier(SizeParser.Parse("offset", ops[1]), SizeParser.Parse("length", ops[2]));
                    return 0;
                }
            case "policy":
                {
                    Need(ops, 1, "tier policy FILE");
                    using var image = QcowImage.Open(ops[0]);
                    image.SetTierPolicy(ParseTier(o.Get("default-tier") ?? TierName(image.DefaultTier)),
                        o.Get("ssd-budget") is { } b ? SizeParser.Parse("ssd-budget", b) : image.SsdBudget);
                    return 0;
                }
            case "status":
                {
                    Need(ops, 1, "tier status FILE");
                    using var image = QcowImage.Open(ops[0], new QcowOpenOptions { ReadOnly = true });
                    if (!image.IsTiered)
                    {
                        throw new CliException($"'{ops[0]}' is not a tiered image");
                    }
                    var usage = image.GetTierUsage();
                    var pins = image.GetTierPins();
                    if (ParseJsonOutput(o))
                    {
                        var ms = new MemoryStream();
                        using (var w = new Utf8JsonWriter(ms, new JsonWriterOptions { Indented = true }))
                        {
                            w.WriteStartObject();
                            w.WriteString("filename", ops[0]);
                            w.WriteString("data-file", image.TierDataFile);
                            w.WriteString("default-tier", TierName(image.DefaultTier));
                            w.WriteNumber("ssd-budget", image.SsdBudget);
                            w.WriteNumber("ssd-bytes", usage.SsdBytes);
                            w.WriteNumber("hdd-bytes", usage.HddBytes);
                            w.WriteStartArray("pins");
                            foreach (var p in pins)
                            {
                                w.WriteStartObject();
                                w.WriteNumber("start", p.Start);
                                w.WriteNumber("length", p.Length);
                                w.WriteString("tier", TierName(p.Tier));
                                w.WriteEndObject();
                            }
                            w.WriteEndArray();
                            w.WriteEndObject();
                        }
                        ctx.Out.WriteLine(System.Text.Encoding.UTF8.GetString(ms.ToArray()));
                        return 0;
                    }
                    ctx.Out.WriteLine($"image: {ops[0]}");
                    ctx.Out.WriteLine($"data file: {image.TierDataFile}");
                    ctx.Out.WriteLine($"default tier: {TierName(image.DefaultTier)}");
                    ctx.Out.WriteLine($"ssd budget: {(image.SsdBudget == 0 ? "none" : HumanUnits.SizeToStr(image.SsdBudget))}");
                    ctx.Out.WriteLine($"ssd: {HumanUnits.SizeToStr(usage.SsdBytes)} ({usage.SsdBytes} bytes)");
                    ctx.Out.WriteLine($"hdd: {HumanUnits.SizeToStr(usage.HddBytes)} ({usage.HddBytes} bytes)");
                    foreach (var p in pins)
                    {
                        ctx.Out.WriteLine($"pin: [{p.Start}, +{p.Length}) -> {TierName(p.Tier)}");
                    }
                    return 0;
                }
            case "move":
                {
                    Need(ops, 3, "tier move --to ssd|hdd FILE OFFSET LENGTH");
                    var to = ParseTier(o.Get("to") ?? throw new CliException("tier move needs --to ssd|hdd"));
                    using var image = QcowImage.Open(ops[0]);
                    var offset = SizeParser.Parse("offset", ops[1]);
                    var length = SizeParser.Parse("length", ops[2]);
                    var bar = new Infrastructure.Progress(ctx, o.Has("p"));
                    var result = image.MoveToTier(offset, length, to, new SyncProgress<long>(b => bar.Advance(100.0 * b / Math.Max(1, length))));
                    bar.Finish();
                    ctx.Out.WriteLine($"Moved {result.ClustersMoved} clusters ({HumanUnits.SizeToStr(result.BytesMoved)}) to {TierName(to)} in {result.Elapsed.TotalSeconds:F3} s.");
                    return 0;
                }
            default:
                throw new CliException($"Unknown tier command '{sub}' (attach, detach, export, pin, unpin, policy, status, move)");
        }
    }

    private static void Need(List<string> ops, int n, string usage)
    {
        if (ops.Count != n)
        {
            throw new CliException($"usage: qcowtier {usage}");
        }
    }

    internal static StorageTier ParseTier(string s) => s.ToLowerInvariant() switch
    {
        "ssd" => StorageTier.Ssd,
        "hdd" => StorageTier.Hdd,
        _ => throw new CliException($"Unknown tier '{s}' (ssd or hdd)"),
    };

    internal static string TierName(StorageTier t) => t == StorageTier.Ssd ? "ssd" : "hdd";
}

/// <summary>Reports on the calling thread, so a progress bar sees every update in order.</summary>
internal sealed class SyncProgress<T>(Action<T> report) : IProgress<T>
{
    public void Report(T value) => report(value);
}
