using BenchmarkDotNet.Columns;
using BenchmarkDotNet.Configs;
using BenchmarkDotNet.Diagnosers;
using BenchmarkDotNet.Running;

namespace QcowTier.Benchmarks;

/// <summary>
/// Entry point: BenchmarkDotNet's switcher, with these additions (removed before BDN parses the rest):
/// <list type="bullet">
/// <item><c>--smoke</c>: every benchmark once (<c>--job dry</c>, 32 MiB fixture unless QCOWTIER_BENCH_SIZE_MB is set,
/// <c>--filter *</c> unless a filter is given, <c>--stopOnFirstError</c>); for CI, to check that no
/// benchmark throws. The exit code is 1 when any benchmark failed.</item>
/// <item><c>--out-of-process</c>: let BDN build and run a separate process per benchmark. The default is
/// in-process (<c>--inProcess</c>): BDN's out-of-process toolchain rebuilds the library into the shared
/// source tree's bin/obj, which collides with other builds running in the same tree.</item>
/// <item><c>--ab</c>: the interleaved A/B runner (<see cref="AbRunner"/>) instead of BenchmarkDotNet.</item>
/// <item>With <c>--smoke</c>, QCOWTIER_BENCH_SMOKE=1 shrinks the tiering benchmarks (see TierSizes).</item>
/// <item><c>--experiment</c>: the tiering experiment (<see cref="Experiment.TieringExperiment"/>; <c>--experiment --help</c>).</item>
/// <item><c>--size-mb N</c>: fixture size (same as QCOWTIER_BENCH_SIZE_MB; default 256).</item>
/// </list>
/// </summary>
public static class Program
{
    public static int Main(string[] args)
    {
        var list = new List<string>(args);
        if (list.Remove("--experiment"))
        {
            return Experiment.TieringExperiment.Run(list);
        }
        var smoke = list.Remove("--smoke");
        var outOfProcess = list.Remove("--out-of-process");
        var sizeAt = list.IndexOf("--size-mb");
        if (sizeAt >= 0 && sizeAt + 1 < list.Count)
        {
            Environment.SetEnvironmentVariable("QCOWTIER_BENCH_SIZE_MB", list[sizeAt + 1]);
            list.RemoveRange(sizeAt, 2);
        }
        if (smoke)
        {
            // Tiering benchmarks: 8 MiB moves, 1/100 of the plan's clusters (see TierSizes).
            Environment.SetEnvironmentVariable("QCOWTIER_BENCH_SMOKE", "1");
        }
        if (smoke && string.IsNullOrEmpty(Environment.GetEnvironmentVariable("QCOWTIER_BENCH_SIZE_MB")))
        {
            Environment.SetEnvironmentVariable("QCOWTIER_BENCH_SIZE_MB", "32");
        }
        if (list.Remove("--ab"))
        {
            if (smoke && !list.Contains("--rounds"))
            {
                list.AddRange(["--rounds", "2", "--batch-ms", "5"]);
            }
            return AbRunner.Run(list);
        }
        if (smoke)
        {
            if (!list.Contains("--job") && !list.Contains("-j"))
            {
                list.AddRange(["--job", "dry"]);
            }
            if (!list.Contains("--filter") && !list.Contains("-f"))
            {
                list.AddRange(["--filter", "*"]);
            }
            if (!list.Contains("--stopOnFirstError"))
            {
                list.Add("--stopOnFirstError");
            }
        }
        if (!outOfProcess && !list.Contains("--inProcess") && !list.Contains("-i"))
        {
            list.Add("--inProcess");
        }

        var config = DefaultConfig.Instance
            .AddDiagnoser(MemoryDiagnoser.Default)
            .AddColumn(new ThroughputColumn())
            .AddColumn(BaselineRatioColumn.RatioMean)
            .AddLogicalGroupRules(BenchmarkLogicalGroupRule.ByCategory, BenchmarkLogicalGroupRule.ByParams)
            .WithOptions(ConfigOptions.JoinSummary);

        var summaries = BenchmarkSwitcher.FromAssembly(typeof(Program).Assembly).Run([.. list], config);
        var failed = false;
        foreach (var s in summaries)
        {
            if (s.HasCriticalValidationErrors)
            {
                failed = true;
            }
            foreach (var r in s.Reports)
            {
                if (!r.Success)
                {
                    Console.Error.WriteLine($"benchmark failed: {r.BenchmarkCase.DisplayInfo}");
                    failed = true;
                }
            }
        }
        return failed ? 1 : 0;
    }
}
