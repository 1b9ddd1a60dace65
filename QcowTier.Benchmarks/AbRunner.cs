using System.Diagnostics;
using System.Globalization;
using System.Reflection;
using BenchmarkDotNet.Attributes;

namespace QcowTier.Benchmarks;

/// <summary>
/// <c>--ab</c>: a small interleaved A/B runner over the same benchmark classes, for a machine shared
/// with other work. BenchmarkDotNet runs all of Raw's iterations, then all of Qcow's, so a burst of
/// load from elsewhere lands on one side only; here each round times one batch of Raw and one batch
/// of Qcow back to back (alternating which goes first), and the ratio is the median of the
/// per-round ratios. Allocation is measured with <see cref="GC.GetTotalAllocatedBytes(bool)"/> over
/// all threads (so async continuations on pool threads count).
/// Options: <c>--rounds N</c> (default 30), <c>--batch-ms N</c> (default 40), <c>--filter substring</c>.
/// </summary>
internal static class AbRunner
{
    private sealed record Side(string Name, MethodInfo Method, MethodInfo? IterationSetup, MethodInfo? IterationCleanup, int OpsPerInvoke);

    private sealed record Result(string Case, string Method, double BaseNs, double Ns, double Ratio, double RatioP25, double RatioP75, double BaseBytes, double Bytes);

    public static int Run(List<string> args)
    {
        var rounds = TakeInt(args, "--rounds", 30);
        var batchMs = TakeInt(args, "--batch-ms", 40);
        var filter = TakeString(args, "--filter");
        var results = new List<Result>();
        var types = typeof(AbRunner).Assembly.GetTypes()
            .Where(t => t.IsPublic && !t.IsAbstract && t.GetMethods().Any(m => m.GetCustomAttribute<BenchmarkAttribute>() is not null))
            .OrderBy(t => t.Name, StringComparer.Ordinal);
        foreach (var type in types)
        {
            foreach (var (label, configure) in ParamCombinations(type))
            {
                var name = type.Name + label;
                if (filter is not null && filter != "*" && !name.Contains(filter.Trim('*'), StringComparison.OrdinalIgnoreCase))
                {
                    continue;
                }
                Console.WriteLine($"// A/B {name}: {rounds} rounds");
                results.AddRange(RunCase(type, name, configure, rounds, batchMs));
            }
        }
        Print(results, rounds, batchMs);
        return 0;
    }

    private static List<Result> RunCase(Type type, string name, Action<object> configure, int rounds, int batchMs)
    {
        var instance = Activator.CreateInstance(type)!;
        configure(instance);
        var methods = type.GetMethods();
        Invoke(methods.Where(m => m.GetCustomAttribute<GlobalSetupAttribute>() is not null), instance);
        try
        {
            // The baseline first, then the others in declaration order.
            var sides = methods.Where(m => m.GetCustomAttribute<BenchmarkAttribute>() is not null)
                .OrderBy(m => m.GetCustomAttribute<BenchmarkAttribute>()!.Baseline ? 0 : 1)
                .ThenBy(m => m.MetadataToken)
                .Select(m => MakeSide(methods, m))
                .ToList();
            var perIteration = sides.Any(x => x.IterationSetup is not null);

            // Warm up (JIT to tier 1, caches) and size the batch so one batch of the baseline takes about batchMs.
            var invocations = 1;
            if (!perIteration)
            {
                for (var i = 0; i < 3; i++)
                {
                    foreach (var side in sides)
                    {
                        TimeBatch(side, instance, 50);
                    }
                }
                var t = TimeBatch(sides[0], instance, 20).Seconds / 20;
                invocations = (int)Math.Clamp(batchMs / 1000.0 / Math.Max(t, 1e-9), 1, 1_000_000);
            }
            else
            {
                foreach (var side in sides)
                {
                    TimeBatch(side, instance, 1);
                }
            }

            var ns = sides.Select(_ => new List<double>()).ToList();
            var bytes = new double[sides.Count];
            for (var r = 0; r < rounds; r++)
            {
                // Rotate the order every round, so no side always runs right after the same neighbour.
                for (var j = 0; j < sides.Count; j++)
                {
                    var k = (j + r) % sides.Count;
                    var (seconds, b) = TimeBatch(sides[k], instance, invocations);
                    var ops = (double)invocations * sides[k].OpsPerInvoke;
                    ns[k].Add(seconds * 1e9 / ops);
                    bytes[k] += b / ops;
                }
            }
            var results = new List<Result>();
            for (var k = 1; k < sides.Count; k++)
            {
                var ratios = ns[k].Zip(ns[0], (x, b) => x / b).Order().ToList();
                results.Add(new Result(name, sides[k].Name, Median(ns[0]), Median(ns[k]), Percentile(ratios, 0.5), Percentile(ratios, 0.25), Percentile(ratios, 0.75),
                    bytes[0] / rounds, bytes[k] / rounds));
            }
            return results;
        }
        finally
        {
            Invoke(methods.Where(m => m.GetCustomAttribute<GlobalCleanupAttribute>() is not null), instance);
        }
    }

    private static Side MakeSide(MethodInfo[] methods, MethodInfo bench)
    {
        MethodInfo? Find<T>()
            where T : TargetedAttribute
            => methods.FirstOrDefault(m => m.GetCustomAttribute<T>() is { } a && (a.Targets is null || a.Targets.Length == 0 || a.Targets.Contains(bench.Name)));
        var ops = bench.GetCustomAttribute<BenchmarkAttribute>()!.OperationsPerInvoke;
        return new Side(bench.Name, bench, Find<IterationSetupAttribute>(), Find<IterationCleanupAttribute>(), ops);
    }

    private static (double Seconds, long Bytes) TimeBatch(Side side, object instance, int invocations)
    {
        side.IterationSetup?.Invoke(instance, null);
        var m = side.Method;
        var sink = 0;
        Func<Task>? asyncCall = m.ReturnType == typeof(Task) ? m.CreateDelegate<Func<Task>>(instance) : null;
        Func<int>? intCall = m.ReturnType == typeof(int) ? m.CreateDelegate<Func<int>>(instance) : null;
        Action? voidCall = m.ReturnType == typeof(void) ? m.CreateDelegate<Action>(instance) : null;
        if (asyncCall is null && intCall is null && voidCall is null)
        {
            throw new NotSupportedException($"{m.DeclaringType?.Name}.{m.Name}: return type {m.ReturnType} is not supported by --ab");
        }
        var bytes0 = GC.GetTotalAllocatedBytes(precise: true);
        var sw = Stopwatch.StartNew();
        for (var i = 0; i < invocations; i++)
        {
            if (asyncCall is not null)
            {
                asyncCall().GetAwaiter().GetResult();
            }
            else if (intCall is not null)
            {
                sink += intCall();
            }
            else
            {
                voidCall!();
            }
        }
        sw.Stop();
        GC.KeepAlive(sink);
        var bytes = GC.GetTotalAllocatedBytes(precise: true) - bytes0;
        side.IterationCleanup?.Invoke(instance, null);
        return (sw.Elapsed.TotalSeconds, bytes);
    }

    private static IEnumerable<(string Label, Action<object> Configure)> ParamCombinations(Type type)
    {
        var p = type.GetProperties().FirstOrDefault(pr => pr.GetCustomAttribute<ParamsAttribute>() is not null);
        if (p is null)
        {
            yield return ("", _ => { });
            yield break;
        }
        foreach (var v in p.GetCustomAttribute<ParamsAttribute>()!.Values)
        {
            yield return ($"({p.Name}={v})", o => p.SetValue(o, v));
        }
    }

    private static void Invoke(IEnumerable<MethodInfo> methods, object instance)
    {
        foreach (var m in methods)
        {
            m.Invoke(instance, null);
        }
    }

    private static double Median(List<double> xs)
    {
        var s = xs.Order().ToList();
        return Percentile(s, 0.5);
    }

    private static double Percentile(List<double> sorted, double q)
    {
        var pos = q * (sorted.Count - 1);
        var lo = (int)Math.Floor(pos);
        var hi = (int)Math.Ceiling(pos);
        return sorted[lo] + (sorted[hi] - sorted[lo]) * (pos - lo);
    }

    private static void Print(List<Result> results, int rounds, int batchMs)
    {
        var ci = CultureInfo.InvariantCulture;
        Console.WriteLine();
        Console.WriteLine($"Interleaved A/B ({rounds} rounds of ~{batchMs} ms batches; medians; Ratio = time / Raw time, per round, <1 is faster; IQR = 25th-75th percentile of the per-round ratios)");
        Console.WriteLine();
        Console.WriteLine("| Case | Method | Raw ns/op | ns/op | Ratio | Ratio IQR | Throughput vs raw | Raw B/op | B/op |");
        Console.WriteLine("|---|---|---:|---:|---:|---|---:|---:|---:|");
        foreach (var r in results)
        {
            Console.WriteLine(string.Create(ci, $"| {r.Case} | {r.Method} | {r.BaseNs:F0} | {r.Ns:F0} | {r.Ratio:F2} | {r.RatioP25:F2}-{r.RatioP75:F2} | {1 / r.Ratio:F2}x | {r.BaseBytes:F1} | {r.Bytes:F1} |"));
        }
    }

    private static int TakeInt(List<string> args, string name, int dflt)
    {
        var s = TakeString(args, name);
        return s is null ? dflt : int.Parse(s, CultureInfo.InvariantCulture);
    }

    private static string? TakeString(List<string> args, string name)
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
}
