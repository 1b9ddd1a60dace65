using System.Diagnostics;
using System.Globalization;
using System.Runtime.InteropServices;
using System.Text;

namespace QcowTier.Benchmarks.Experiment;

/// <summary>One replayed (workload, placement) cell.</summary>
internal sealed record Cell(
    string Workload,
    string Config,
    double? BudgetPercent,
    int Replayed,
    int WindowReads,
    double MeanMs,
    double P50Ms,
    double P99Ms,
    double SsdShare,
    double ReplayedSsdShare,
    double? OracleShare,
    double? PredictedShare,
    bool? WorthActing,
    long BytesMoved,
    long BytesToSsd,
    long BytesToHdd,
    int Moves,
    double ApplySeconds,
    double? Hottest20);

/// <summary>
/// The tiering experiment (issue 8): an emulated HDD (slowdisk, or an in-process latency model), a
/// local SSD, VM-like workloads, and the rebalancer trained on one window and judged on the next.
/// Run: <c>dotnet run -c Release --project QcowTier.Benchmarks -- --experiment [--quick]</c>;
/// <c>scripts/tiering-experiment.sh</c> also records a QEMU trace and writes docs/.
/// </summary>
internal static unsafe class TieringExperiment
{
    private const int ClusterSize = 65536;
    private const int MaxRequest = 1 << 20;

    private static void Usage() => Console.WriteLine("""
        tiering experiment: --experiment [options]
          --quick               small image and windows (a smoke run, ~1 min)
          --work DIR            where the images go (default a new dir under /var/tmp; not tmpfs: O_DIRECT)
          --out DIR             where the PNGs and results.md go (default DIR-of-work/out)
          --doc FILE            also write the "Tiering experiment" section of FILE (docs/BENCHMARKS.md)
          --trace FILE          a QEMU trace log (blk_co_preadv/pwritev) for the qemu-trace workload
          --hdd slowdisk|inproc HDD emulation (default slowdisk when the tool works, else inproc)
          --slowdisk PATH       the slowdisk script (default /work/shared/tools/slowdisk)
          --latency-ms N        injected HDD latency per request (default 8)
          --rate BYTES          HDD bandwidth, bytes/s (default 150000000)
          --cell-seconds N      cap on replay time per cell (default 20; --quick 2)
          --size-mb N           virtual size (default 1024; --quick 64)
          --keep                keep the work dir
          --replot results.md   redraw the PNGs from a results table this program wrote (into --out or its folder)
        """);

    public static int Run(List<string> args)
    {
        string? Opt(string name)
        {
            var i = args.IndexOf(name);
            if (i < 0 || i + 1 >= args.Count)
            {
                return null;
            }
            var v = args[i + 1];
            args.RemoveRange(i, 2);
            return v;
        }
        if (args.Remove("--help") || args.Remove("-h"))
        {
            Usage();
            return 0;
        }
        var replot = Opt("--replot");
        if (replot is not null)
        {
            return Replot(replot, Opt("--out") ?? Path.GetDirectoryName(Path.GetFullPath(replot))!);
        }
        var quick = args.Remove("--quick");
        var keep = args.Remove("--keep");
        var work = Opt("--work");
        var outDir = Opt("--out");
        var doc = Opt("--doc");
        var trace = Opt("--trace");
        var hdd = Opt("--hdd") ?? "slowdisk";
        var tool = Opt("--slowdisk") ?? "/work/shared/tools/slowdisk";
        var latencyMs = double.Parse(Opt("--latency-ms") ?? "8", CultureInfo.InvariantCulture);
        var rate = double.Parse(Opt("--rate") ?? "150000000", CultureInfo.InvariantCulture);
        var cellSeconds = double.Parse(Opt("--cell-seconds") ?? (quick ? "2" : "20"), CultureInfo.InvariantCulture);
        var sizeMb = long.Parse(Opt("--size-mb") ?? (quick ? "64" : "1024"), CultureInfo.InvariantCulture);
        if (args.Count > 0)
        {
            Console.Error.WriteLine($"experiment: unknown arguments: {string.Join(' ', args)}");
            Usage();
            return 64;
        }

        var size = sizeMb << 20;
        // Training: ~20 requests per cluster, so the heat of a workload without skew is not mistaken for
        // skew (with ~3 reads per cluster, Poisson noise alone puts ~35 % of the reads in the "hottest" 20 %).
        // Test window: 200 k reads for the SSD share and the oracle (placement only, no I/O); its first
        // `replay` reads are replayed for latency.
        var clusters = (int)(size / ClusterSize);
        var trainCount = 20 * clusters;
        var testCount = quick ? 20000 : 200000;
        var replayCount = quick ? 2000 : 20000;
        double[] budgets = [5, 10, 20, 40];

        var emu = new HddEmulation(hdd == "inproc" ? null : tool, latencyMs, rate);
        if (!emu.InProcess && !File.Exists(tool))
        {
            emu = new HddEmulation(null, latencyMs, rate);
            Console.Error.WriteLine($"experiment: {tool} not found; using the in-process latency model");
        }

        work ??= Directory.CreateTempSubdirectory("qcowtier-experiment.").FullName is var t && t.StartsWith("/tmp/", StringComparison.Ordinal)
            ? Directory.CreateDirectory(Path.Combine("/var/tmp", Path.GetFileName(t))).FullName
            : t;
        Directory.CreateDirectory(work);
        outDir ??= Path.Combine(work, "out");
        Directory.CreateDirectory(outDir);
        var started = DateTime.UtcNow;
        var sw = Stopwatch.StartNew();
        Log($"work dir {work}, {sizeMb} MiB virtual, {ClusterSize >> 10} KiB clusters, train {trainCount} / test {testCount} requests (replay {replayCount}), cap {cellSeconds} s per cell");

        try
        {
            // ---- images: all on HDD, all on SSD, and the starting point of tiering (first 10 % written on SSD)
            var hddAll = BuildImage(Path.Combine(work, "hdd-all"), size, StorageTier.Hdd, 0);
            var ssdAll = BuildImage(Path.Combine(work, "ssd-all"), size, StorageTier.Ssd, 0);
            var before = BuildImage(Path.Combine(work, "before"), size, StorageTier.Ssd, size / 10);
            Log($"images built ({sw.Elapsed.TotalSeconds:0} s)");

            var workloads = new List<Workload>
            {
                Workloads.Zipf(size, ClusterSize, trainCount, testCount),
                Workloads.Zipf(size, ClusterSize, trainCount, testCount, 1.2),
                Workloads.Shift(size, ClusterSize, trainCount, testCount),
                Workloads.Scans(size, trainCount, testCount),
                Workloads.Uniform(size, trainCount, testCount),
            };
            string traceNote;
            var traceWl = trace is null ? null : Workloads.QemuTrace(trace, size);
            if (traceWl is not null)
            {
                workloads.Add(traceWl);
                traceNote = traceWl.Description;
            }
            else
            {
                traceNote = trace is null ? "no --trace given: the qemu-trace workload was skipped" : $"{trace}: missing or without blk_co_preadv/pwritev lines: skipped";
                Log(traceNote);
            }

            var cells = new List<Cell>();
            var mountDir = Path.Combine(work, "mnt");
            foreach (var wl in workloads)
            {
                Log($"workload {wl.Name}: {wl.Description}");
                var heat = Train(before, wl, size);
                var counts = ClusterCounts(wl.Test, size);
                var windowReads = wl.Test.Count;
                cells.Add(Replay(emu, hddAll, mountDir, wl, "all-HDD", null, counts, replayCount, cellSeconds, null));
                cells.Add(Replay(emu, ssdAll, mountDir, wl, "all-SSD", null, counts, replayCount, cellSeconds, null));
                cells.Add(Replay(emu, before, mountDir, wl, "tiered, before", null, counts, replayCount, cellSeconds, null));
                foreach (var b in budgets)
                {
                    var dir = Path.Combine(work, $"cell-{wl.Name}-{b}");
                    CopyImage(before, dir);
                    RebalancePlan plan;
                    RebalanceResult result;
                    using (var img = QcowImage.Open(Path.Combine(dir, "vm.qcow2")))
                    {
                        plan = Rebalancer.Plan([new RebalanceInput(img, heat)], new RebalancePolicy { SsdBudgetPercent = b });
                        result = Rebalancer.Apply(plan, [img]);
                        img.Flush();
                    }
                    var info = new PlanInfo(plan, result);
                    cells.Add(Replay(emu, dir, mountDir, wl, $"tiered {b}%", b, counts, replayCount, cellSeconds, info));
                    if (!keep)
                    {
                        Directory.Delete(dir, true);
                    }
                }
                Log($"workload {wl.Name} done ({sw.Elapsed.TotalSeconds:0} s)");
            }

            var report = Report(cells, workloads, emu, quick, size, trainCount, testCount, replayCount, cellSeconds, started, sw.Elapsed, traceNote, outDir, doc);
            Console.WriteLine(report);
            File.WriteAllText(Path.Combine(outDir, "results.md"), report);
            Plot(cells, [.. workloads.Select(w => w.Name)], outDir, budgets);
            if (doc is not null)
            {
                WriteDocSection(doc, report);
                Log($"wrote the Tiering experiment section of {doc}");
            }
            Log($"done in {sw.Elapsed.TotalMinutes:0.0} min; PNGs and results.md in {outDir}");
            return 0;
        }
        finally
        {
            if (!keep)
            {
                foreach (var d in new[] { "hdd-all", "ssd-all", "before" })
                {
                    var p = Path.Combine(work, d);
                    if (Directory.Exists(p))
                    {
                        Directory.Delete(p, true);
                    }
                }
            }
        }
    }

    private sealed record PlanInfo(RebalancePlan Plan, RebalanceResult Result);

    private static void Log(string s) => Console.Error.WriteLine($"experiment [{DateTime.UtcNow:HH:mm:ss}]: {s}");

    /// <summary>A fully written tiered image in <paramref name="dir"/> (vm.qcow2 + vm.hdd), clusters written in a shuffled order.</summary>
    private static string BuildImage(string dir, long size, StorageTier defaultTier, long ssdBudget)
    {
        Directory.CreateDirectory(dir);
        var path = Path.Combine(dir, "vm.qcow2");
        var clusters = (int)(size / ClusterSize);
        var order = new int[clusters];
        for (var i = 0; i < clusters; i++)
        {
            order[i] = i;
        }
        new Random(23).Shuffle(order);
        var data = new byte[ClusterSize];
        new Random(29).NextBytes(data);
        using (var img = QcowImage.Create(path, size, new QcowCreateOptions
        {
            Tier = new QcowTierOptions { DataFile = "vm.hdd", DefaultTier = defaultTier, SsdBudget = ssdBudget },
        }))
        {
            foreach (var c in order)
            {
                BitConverter.TryWriteBytes(data, (long)c);
                img.Write((long)c * ClusterSize, data);
            }
            img.Flush();
            var u = img.GetTierUsage();
            Log($"{Path.GetFileName(dir)}: SSD {u.SsdBytes >> 20} MiB, HDD {u.HddBytes >> 20} MiB");
        }
        return dir;
    }

    private static void CopyImage(string from, string to)
    {
        Directory.CreateDirectory(to);
        foreach (var f in new[] { "vm.qcow2", "vm.hdd" })
        {
            File.Copy(Path.Combine(from, f), Path.Combine(to, f), true);
        }
    }

    /// <summary>The heat map of the training window, recorded through the image's HeatRecorder (or imported from the trace).</summary>
    private static HeatMap Train(string dir, Workload wl, long size)
    {
        using var img = QcowImage.Open(Path.Combine(dir, "vm.qcow2"), new QcowOpenOptions { ReadOnly = true });
        var heat = new HeatMap(img.Size, img.ClusterSize, imageId: img.HeatIdentity);
        if (wl.TrainTrace is not null)
        {
            var r = HeatImport.Import(new StringReader(wl.TrainTrace), HeatTraceFormat.QemuTrace, heat);
            Log($"  trained from the trace with HeatImport: {r.LinesRead} lines, {r.ReadsImported} reads and {r.WritesImported} writes imported, {r.LinesIgnored} ignored, {r.MalformedLines} malformed");
        }
        else
        {
            img.HeatRecorder = heat;
            var buf = new byte[MaxRequest];
            foreach (var q in wl.Train!)
            {
                if (q.Write)
                {
                    heat.RecordWrite(q.Offset, q.Length);
                }
                else
                {
                    img.Read(q.Offset, buf.AsSpan(0, q.Length));
                }
            }
            img.HeatRecorder = null;
        }
        heat.Save(Path.Combine(Path.GetDirectoryName(dir)!, wl.Name + ".heat"));
        return heat;
    }

    private static long[] ClusterCounts(IReadOnlyList<IoRequest> reqs, long size)
    {
        var counts = new long[size / ClusterSize];
        foreach (var q in reqs)
        {
            for (var c = q.Offset / ClusterSize; c <= (q.Offset + q.Length - 1) / ClusterSize; c++)
            {
                counts[c]++;
            }
        }
        return counts;
    }

    /// <summary>Oracle: the budget filled with the test window's hottest clusters; its share of the window's cluster touches.</summary>
    private static double OracleShare(long[] counts, double budgetPercent)
    {
        var n = (int)(counts.Length * budgetPercent / 100);
        var sorted = counts.OrderByDescending(x => x).ToArray();
        var total = sorted.Sum();
        return total == 0 ? 0 : (double)sorted.Take(n).Sum() / total;
    }

    private static Cell Replay(HddEmulation emu, string dir, string mountDir, Workload wl, string config, double? budget, long[] counts, int replayCount, double capSeconds, PlanInfo? info)
    {
        using var mount = emu.Expose(Path.Combine(dir, "vm.hdd"), mountDir);
        using var img = QcowImage.Open(Path.Combine(dir, "vm.qcow2"), new QcowOpenOptions
        {
            ReadOnly = true,
            CacheMode = QcowCacheMode.None,
            ForceShare = true,
            TierDataFile = emu.InProcess ? null : mount.Path,
        });
        var onSsd = new bool[counts.Length];
        foreach (var e in img.GetPlacement())
        {
            if (e.Tier == StorageTier.Ssd)
            {
                for (var c = e.Start / ClusterSize; c < (e.Start + e.Length) / ClusterSize; c++)
                {
                    onSsd[c] = true;
                }
            }
        }
        long ssdTouches = 0, touches = 0;
        for (var c = 0; c < counts.Length; c++)
        {
            touches += counts[c];
            if (onSsd[c])
            {
                ssdTouches += counts[c];
            }
        }
        var share = touches == 0 ? 0 : (double)ssdTouches / touches;

        var buf = (byte*)NativeMemory.AlignedAlloc(MaxRequest, 4096);
        var lat = new List<double>(wl.Test.Count);
        long replayedSsd = 0, replayedTouches = 0;
        try
        {
            var span = new Span<byte>(buf, MaxRequest);
            var cap = (long)(capSeconds * Stopwatch.Frequency);
            var begin = Stopwatch.GetTimestamp();
            foreach (var q in wl.Test.Take(replayCount))
            {
                for (var c = q.Offset / ClusterSize; c <= (q.Offset + q.Length - 1) / ClusterSize; c++)
                {
                    replayedTouches++;
                    replayedSsd += onSsd[c] ? 1 : 0;
                }
                var t0 = Stopwatch.GetTimestamp();
                img.Read(q.Offset, span[..q.Length]);
                if (emu.InProcess)
                {
                    var hddPart = false;
                    for (var c = q.Offset / ClusterSize; c <= (q.Offset + q.Length - 1) / ClusterSize; c++)
                    {
                        hddPart |= !onSsd[c];
                    }
                    if (hddPart)
                    {
                        emu.Delay(t0, q.Length);
                    }
                }
                var t1 = Stopwatch.GetTimestamp();
                lat.Add((t1 - t0) * 1000.0 / Stopwatch.Frequency);
                if (t1 - begin > cap && lat.Count >= 50)
                {
                    break;
                }
            }
        }
        finally
        {
            NativeMemory.AlignedFree(buf);
        }
        lat.Sort();
        var mean = lat.Average();
        var p50 = lat[(int)(lat.Count * 0.50)];
        var p99 = lat[Math.Min(lat.Count - 1, (int)Math.Ceiling(lat.Count * 0.99) - 1)];
        var cell = new Cell(wl.Name, config, budget, lat.Count, wl.Test.Count, mean, p50, p99, share, replayedSsd / Math.Max(1.0, replayedTouches),
            budget is { } b ? OracleShare(counts, b) : null,
            info?.Plan.After.ReadShare, info?.Plan.WorthActing,
            info?.Result.BytesMoved ?? 0, info?.Plan.BytesToSsd ?? 0, info?.Plan.BytesToHdd ?? 0, info?.Result.MovesApplied ?? 0, info?.Result.Elapsed.TotalSeconds ?? 0,
            info?.Plan.Hottest20Share);
        Log($"  {config,-15} {lat.Count,6}/{wl.Test.Count} reads  mean {mean,8:0.000} ms  p99 {p99,8:0.000} ms  SSD share {share:P1}" +
            (cell.OracleShare is { } o ? $"  oracle {o:P1}" : "") + (info is null ? "" : $"  moved {info.Result.BytesMoved >> 20} MiB (to SSD {info.Plan.BytesToSsd >> 20}, to HDD {info.Plan.BytesToHdd >> 20}), worth acting {info.Plan.WorthActing}"));
        return cell;
    }

    // ------------------------------------------------------------------ output

    private static string Machine()
    {
        var sb = new StringBuilder();
        string Run(string file, string args)
        {
            try
            {
                var psi = new ProcessStartInfo(file, args) { RedirectStandardOutput = true, UseShellExecute = false };
                using var p = Process.Start(psi)!;
                var s = p.StandardOutput.ReadToEnd();
                p.WaitForExit();
                return s;
            }
            catch (System.ComponentModel.Win32Exception)
            {
                return "";
            }
        }
        var lscpu = Run("lscpu", "");
        string Field(string name) => lscpu.Split('\n').Where(l => l.StartsWith(name + ":", StringComparison.Ordinal)).Select(l => l[(name.Length + 1)..].Trim()).FirstOrDefault() ?? "?";
        sb.AppendLine("| Machine | |");
        sb.AppendLine("|---|---|");
        sb.AppendLine(CultureInfo.InvariantCulture, $"| CPU (lscpu) | {Field("Model name")}, {Field("CPU(s)")} CPU(s), {Field("Hypervisor vendor")} hypervisor |");
        sb.AppendLine(CultureInfo.InvariantCulture, $"| nproc | {Run("nproc", "").Trim()} |");
        sb.AppendLine(CultureInfo.InvariantCulture, $"| Kernel | {Run("uname", "-r").Trim()} |");
        sb.AppendLine(CultureInfo.InvariantCulture, $"| .NET | {Environment.Version} |");
        sb.AppendLine(CultureInfo.InvariantCulture, $"| Load average at the end | {File.ReadAllText("/proc/loadavg").Trim()} |");
        return sb.ToString();
    }

    private static string Pct(double? v) => v is { } x ? x.ToString("P1", CultureInfo.InvariantCulture) : "–";

    private static string Report(List<Cell> cells, List<Workload> workloads, HddEmulation emu, bool quick, long size, int train, int test, int replay, double cap, DateTime started, TimeSpan took, string traceNote, string outDir, string? doc)
    {
        var inv = CultureInfo.InvariantCulture;
        var sb = new StringBuilder();
        sb.AppendLine(inv, $"Generated by `{(quick ? "--experiment --quick" : "--experiment")}` (scripts/tiering-experiment.sh) on {started:yyyy-MM-dd HH:mm} UTC, {took.TotalMinutes:0.0} min.");
        sb.AppendLine();
        sb.AppendLine(Machine());
        sb.AppendLine(inv, $"**HDD emulation:** {emu.Describe()}. **SSD:** the image's primary file, a local file (ext4 on virtio disk) opened with cache=none.");
        sb.AppendLine();
        sb.AppendLine(inv, $"**Setup:** {size >> 20} MiB virtual tiered image, 64 KiB clusters, every cluster written (in a shuffled order). " +
            $"`all-HDD`: every cluster in the HDD data file; `all-SSD`: every cluster in the primary file; `tiered, before`: SSD budget 10 % for new clusters, so the first 10 % of clusters written (random ones) are on SSD; " +
            $"`tiered B%`: a copy of `before` rebalanced (`Rebalancer.Plan` with `SsdBudgetPercent = B`, other policy fields default, then `Rebalancer.Apply`) from the heat of the training window. " +
            $"Training window {train} requests (20 per cluster), recorded through `QcowImage.HeatRecorder` (trace: `HeatImport`, QEMU trace format); test window {test} reads (trace: the reads after its median read), " +
            $"the first {replay} of which are replayed one at a time (queue depth 1) through `QcowImage.Read`, at most {cap} s per cell (the `Reads` column says how many were replayed of the window; latencies are over those). " +
            $"SSD share = share of the whole test window's cluster touches whose cluster is on SSD in `GetPlacement`; oracle = the same share for the best placement of that window " +
            $"(the budget filled with its hottest clusters); predicted = the plan's `After.ReadShare` (from the training heat).");
        sb.AppendLine();
        foreach (var wl in workloads)
        {
            sb.AppendLine(inv, $"* **{wl.Name}**: {wl.Description}.");
        }
        if (!workloads.Any(w => w.TrainTrace is not null))
        {
            sb.AppendLine(inv, $"* qemu-trace: {traceNote}.");
        }
        sb.AppendLine();
        sb.AppendLine("| Workload | Placement | Reads replayed | Mean ms | p50 ms | p99 ms | SSD share | Oracle | Share ÷ oracle | Predicted | SSD share, replayed reads | Worth acting | MiB to SSD / to HDD | Apply s | all-HDD mean ÷ mean |");
        sb.AppendLine("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|");
        foreach (var c in cells)
        {
            var hdd = cells.First(x => x.Workload == c.Workload && x.Config == "all-HDD");
            sb.AppendLine(inv, $"| {c.Workload} | {c.Config} | {c.Replayed}/{c.WindowReads} | {c.MeanMs:0.000} | {c.P50Ms:0.000} | {c.P99Ms:0.000} | {Pct(c.SsdShare)} | {Pct(c.OracleShare)} | " +
                $"{(c.OracleShare is > 0 ? (c.SsdShare / c.OracleShare.Value).ToString("0.00", inv) : "–")} | {Pct(c.PredictedShare)} | {Pct(c.ReplayedSsdShare)} | {(c.WorthActing is { } w ? (w ? "yes" : "**no**") : "–")} | " +
                $"{(c.BudgetPercent is null ? "–" : $"{c.BytesToSsd >> 20} / {c.BytesToHdd >> 20}")} | {(c.BudgetPercent is null ? "–" : c.ApplySeconds.ToString("0.0", inv))} | {hdd.MeanMs / c.MeanMs:0.0}× |");
        }
        sb.AppendLine();
        sb.AppendLine("**Goals** (checked by the program):");
        sb.AppendLine();
        foreach (var wl in workloads)
        {
            var c10 = cells.FirstOrDefault(x => x.Workload == wl.Name && x.BudgetPercent == 10);
            var hdd = cells.First(x => x.Workload == wl.Name && x.Config == "all-HDD");
            if (c10 is null)
            {
                continue;
            }
            if (wl.ExpectNoSkew)
            {
                var moved = cells.Where(x => x.Workload == wl.Name && x.BudgetPercent is not null).Max(x => x.BytesToSsd);
                var ok = cells.Where(x => x.Workload == wl.Name && x.BudgetPercent is not null).All(x => x.WorthActing == false) && moved <= size / 100;
                sb.AppendLine(inv, $"* {wl.Name} (no skew): plan.WorthActing false at every budget and at most 1 % of the image promoted to SSD (demotions that only bring `before`'s 10 % down to a smaller budget are not counted): **{(ok ? "met" : "NOT met")}** " +
                    $"(worth acting: {string.Join(", ", cells.Where(x => x.Workload == wl.Name && x.BudgetPercent is not null).Select(x => $"{x.BudgetPercent}% {(x.WorthActing == true ? "yes" : "no")}"))}; most promoted {moved >> 20} MiB; hottest 20 % served {Pct(c10.Hottest20)}).");
            }
            else
            {
                var ratio = c10.OracleShare is > 0 ? c10.SsdShare / c10.OracleShare.Value : 0;
                var speed = hdd.MeanMs / c10.MeanMs;
                var ssd = cells.First(x => x.Workload == wl.Name && x.Config == "all-SSD");
                var o = c10.OracleShare ?? 0;
                var bound = hdd.MeanMs / ((1 - o) * hdd.MeanMs + o * ssd.MeanMs);
                sb.AppendLine(inv, $"* {wl.Name} at 10 %: SSD share {Pct(c10.SsdShare)} = {ratio:P1} of the oracle's {Pct(c10.OracleShare)} (goal ≥ 95 %: **{(ratio >= 0.95 ? "met" : "not met")}**); " +
                    $"mean read latency {c10.MeanMs:0.000} ms vs {hdd.MeanMs:0.000} ms all-HDD = {speed:0.0}× lower (goal ≥ 10×: **{(speed >= 10 ? "met" : "not met")}**; the oracle's placement would give at best {bound:0.0}× with this run's all-HDD and all-SSD means).");
            }
        }
        sb.AppendLine();
        var rel = doc is null ? outDir : Path.GetRelativePath(Path.GetDirectoryName(Path.GetFullPath(doc))!, outDir);
        sb.AppendLine(inv, $"![mean read latency vs SSD budget]({rel}/latency-vs-budget.png)");
        sb.AppendLine();
        sb.AppendLine(inv, $"![p99 read latency vs SSD budget]({rel}/p99-vs-budget.png)");
        sb.AppendLine();
        sb.AppendLine(inv, $"![SSD share of reads vs the oracle]({rel}/ssd-share-vs-oracle.png)");
        return sb.ToString();
    }

    private static void Plot(List<Cell> cells, List<string> workloads, string outDir, double[] budgets)
    {
        string[] configs = ["all-HDD", "tiered, before", .. budgets.Select(b => $"tiered {b}%"), "all-SSD"];
        string[] xl = ["HDD", "before", .. budgets.Select(b => $"{b}%"), "SSD"];
        var lat = new List<Series>();
        var p99 = new List<Series>();
        var share = new List<Series>();
        for (var i = 0; i < workloads.Count; i++)
        {
            var wl = new { Name = workloads[i] };
            var col = Plots.Palette[i % Plots.Palette.Length];
            double V(string cfg, Func<Cell, double> f) => cells.FirstOrDefault(c => c.Workload == wl.Name && c.Config == cfg) is { } c ? f(c) : double.NaN;
            lat.Add(new Series(wl.Name, col, [.. configs.Select(cfg => V(cfg, c => c.MeanMs))]));
            p99.Add(new Series(wl.Name, col, [.. configs.Select(cfg => V(cfg, c => c.P99Ms))]));
            share.Add(new Series(wl.Name, col, [.. budgets.Select(b => V($"tiered {b}%", c => c.SsdShare * 100))]));
            share.Add(new Series(wl.Name + " oracle", col, [.. budgets.Select(b => V($"tiered {b}%", c => (c.OracleShare ?? double.NaN) * 100))], Dashed: true));
        }
        Plots.LineChart(Path.Combine(outDir, "latency-vs-budget.png"), "Mean read latency vs SSD budget (QD1)", "mean latency, ms (log)", xl, lat, logY: true);
        Plots.LineChart(Path.Combine(outDir, "p99-vs-budget.png"), "p99 read latency vs SSD budget (QD1)", "p99 latency, ms (log)", xl, p99, logY: true);
        Plots.LineChart(Path.Combine(outDir, "ssd-share-vs-oracle.png"), "Reads served by SSD after rebalancing vs oracle (dashed)", "% of reads on SSD", [.. budgets.Select(b => $"{b}%")], share, logY: false, yMin: 0, yMax: 100);
    }

    /// <summary>Redraws the PNGs from the results table of a previous run (results.md or BENCHMARKS.md).</summary>
    private static int Replot(string path, string outDir)
    {
        static double Num(string s) => double.Parse(s.Trim().TrimEnd('%', '×').Trim(), CultureInfo.InvariantCulture);
        static double? Opt(string s) => s.Trim() is "–" or "" ? null : Num(s) / 100;
        var cells = new List<Cell>();
        var names = new List<string>();
        var budgets = new SortedSet<double>();
        foreach (var line in File.ReadLines(path))
        {
            var f = line.Split('|');
            // | workload | placement | reads | mean | p50 | p99 | share | oracle | ... (15 columns)
            if (f.Length != 17 || !f[3].Contains('/', StringComparison.Ordinal))
            {
                continue;
            }
            var wl = f[1].Trim();
            var cfg = f[2].Trim();
            double? b = cfg.StartsWith("tiered ", StringComparison.Ordinal) && cfg.EndsWith('%') ? Num(cfg[7..]) : null;
            if (b is { } bb)
            {
                budgets.Add(bb);
            }
            if (!names.Contains(wl))
            {
                names.Add(wl);
            }
            cells.Add(new Cell(wl, cfg, b, 0, 0, Num(f[4]), Num(f[5]), Num(f[6]), Opt(f[7]) ?? 0, 0, Opt(f[8]), null, null, 0, 0, 0, 0, 0, null));
        }
        if (cells.Count == 0)
        {
            Console.Error.WriteLine($"experiment: no results table in {path}");
            return 1;
        }
        Plot(cells, names, outDir, [.. budgets]);
        Log($"redrew {cells.Count} cells of {names.Count} workloads into {outDir}");
        return 0;
    }

    private static void WriteDocSection(string doc, string report)
    {
        const string begin = "<!-- BEGIN tiering-experiment (generated by scripts/tiering-experiment.sh; edits here are overwritten) -->";
        const string end = "<!-- END tiering-experiment -->";
        var text = File.Exists(doc) ? File.ReadAllText(doc) : "# Benchmarks\n";
        var b = text.IndexOf("<!-- BEGIN tiering-experiment", StringComparison.Ordinal);
        var e = text.IndexOf(end, StringComparison.Ordinal);
        var block = begin + "\n" + report.TrimEnd() + "\n" + end;
        if (b >= 0 && e > b)
        {
            text = text[..b] + block + text[(e + end.Length)..];
        }
        else
        {
            text = text.TrimEnd() + "\n\n## Tiering experiment\n\n" + block + "\n";
        }
        File.WriteAllText(doc, text);
    }
}
