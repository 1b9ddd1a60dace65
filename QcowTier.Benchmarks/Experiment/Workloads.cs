using System.Globalization;
using System.Text;
using System.Text.RegularExpressions;

namespace QcowTier.Benchmarks.Experiment;

/// <summary>One guest request of a workload window.</summary>
internal readonly record struct IoRequest(bool Write, long Offset, int Length);

/// <summary>
/// A workload for the tiering experiment: a training window (fed to a heat map) and a test window
/// (replayed, reads only, against each placement).
/// </summary>
internal sealed class Workload
{
    public required string Name { get; init; }

    public required string Description { get; init; }

    /// <summary>Training requests, fed through the image's <see cref="QcowImage.HeatRecorder"/>. Null when <see cref="TrainTrace"/> is used.</summary>
    public IReadOnlyList<IoRequest>? Train { get; init; }

    /// <summary>Training window as QEMU trace-log text, imported with <see cref="HeatImport"/>.</summary>
    public string? TrainTrace { get; init; }

    /// <summary>Reads replayed against every placement.</summary>
    public required IReadOnlyList<IoRequest> Test { get; init; }

    /// <summary>True for the workload without skew (the rebalancer should decline to act).</summary>
    public bool ExpectNoSkew { get; init; }
}

/// <summary>Zipf(s) over n items: item 0 is the most popular.</summary>
internal sealed class ZipfSampler
{
    private readonly double[] _cdf;

    public ZipfSampler(int n, double s)
    {
        _cdf = new double[n];
        double sum = 0;
        for (var i = 0; i < n; i++)
        {
            sum += 1.0 / Math.Pow(i + 1, s);
            _cdf[i] = sum;
        }
        for (var i = 0; i < n; i++)
        {
            _cdf[i] /= sum;
        }
    }

    public int Next(Random rng)
    {
        var u = rng.NextDouble();
        var i = Array.BinarySearch(_cdf, u);
        if (i < 0)
        {
            i = ~i;
        }
        return Math.Min(i, _cdf.Length - 1);
    }
}

/// <summary>The deterministic (seeded) workloads of the experiment.</summary>
internal static class Workloads
{
    public const double Skew = 0.99;
    private const int Block = 4096;

    private static int[] Permutation(int n, int seed)
    {
        var p = new int[n];
        for (var i = 0; i < n; i++)
        {
            p[i] = i;
        }
        new Random(seed).Shuffle(p);
        return p;
    }

    /// <summary>4 KiB reads; the cluster is Zipf-distributed (rank → cluster through a permutation), the block in it uniform.</summary>
    private static List<IoRequest> ZipfReads(int count, long size, int clusterSize, int[] perm, int seed, double skew = Skew)
    {
        var zipf = new ZipfSampler(perm.Length, skew);
        var rng = new Random(seed);
        var blocksPerCluster = clusterSize / Block;
        var list = new List<IoRequest>(count);
        for (var i = 0; i < count; i++)
        {
            var cluster = perm[zipf.Next(rng)];
            var off = (long)cluster * clusterSize + (long)rng.Next(blocksPerCluster) * Block;
            list.Add(new IoRequest(false, Math.Min(off, size - Block), Block));
        }
        return list;
    }

    public static Workload Zipf(long size, int clusterSize, int train, int test, double skew = Skew)
    {
        var perm = Permutation((int)(size / clusterSize), 11);
        var name = skew == Skew ? "zipf" : $"zipf-{skew.ToString(CultureInfo.InvariantCulture)}";
        return new Workload
        {
            Name = name,
            Description = $"4 KiB random reads, Zipf s={skew.ToString(CultureInfo.InvariantCulture)} over 64 KiB clusters (rank→cluster shuffled), same distribution in both windows",
            Train = ZipfReads(train, size, clusterSize, perm, 1, skew),
            Test = ZipfReads(test, size, clusterSize, perm, 2, skew),
        };
    }

    public static Workload Uniform(long size, int train, int test)
    {
        static List<IoRequest> Make(int n, long size, int seed)
        {
            var rng = new Random(seed);
            var blocks = size / Block;
            var list = new List<IoRequest>(n);
            for (var i = 0; i < n; i++)
            {
                list.Add(new IoRequest(false, rng.NextInt64(blocks) * Block, Block));
            }
            return list;
        }
        return new Workload
        {
            Name = "uniform",
            Description = "4 KiB reads uniformly at random over the whole disk (no skew)",
            Train = Make(train, size, 3),
            Test = Make(test, size, 4),
            ExpectNoSkew = true,
        };
    }

    /// <summary>Sequential scans: 4 MiB extents read front to back in 64 KiB requests, the extent Zipf-chosen.</summary>
    public static Workload Scans(long size, int train, int test)
    {
        const int extent = 4 << 20;
        const int req = 64 << 10;
        var extents = (int)(size / extent);
        var perm = Permutation(extents, 13);
        List<IoRequest> Make(int n, int seed)
        {
            var zipf = new ZipfSampler(extents, Skew);
            var rng = new Random(seed);
            var list = new List<IoRequest>(n);
            while (list.Count < n)
            {
                var start = (long)perm[zipf.Next(rng)] * extent;
                for (var o = 0; o < extent && list.Count < n; o += req)
                {
                    list.Add(new IoRequest(false, start + o, req));
                }
            }
            return list;
        }
        return new Workload
        {
            Name = "scan",
            Description = $"sequential scans: a 4 MiB extent read front to back in 64 KiB requests, extents Zipf s={Skew}",
            Train = Make(train, 5),
            Test = Make(test, 6),
        };
    }

    /// <summary>Day N and day N+1: the same Zipf shape, but 30 % of the rank→cluster assignments are reshuffled overnight.</summary>
    public static Workload Shift(long size, int clusterSize, int train, int test)
    {
        var n = (int)(size / clusterSize);
        var day1 = Permutation(n, 17);
        var day2 = (int[])day1.Clone();
        var rng = new Random(19);
        for (var i = 0; i < n * 3 / 10 / 2; i++)
        {
            var a = rng.Next(n);
            var b = rng.Next(n);
            (day2[a], day2[b]) = (day2[b], day2[a]);
        }
        return new Workload
        {
            Name = "shift",
            Description = $"Zipf s={Skew} 4 KiB reads; trained on day N, replayed on day N+1 after ~30 % of the ranks moved to other clusters",
            Train = ZipfReads(train, size, clusterSize, day1, 7),
            Test = ZipfReads(test, size, clusterSize, day2, 8),
        };
    }

    private static readonly Regex TraceLine = new(@"blk_co_(preadv|pwritev)\b.*?\boffset (\d+) bytes (\d+)", RegexOptions.Compiled | RegexOptions.CultureInvariant);

    /// <summary>
    /// A QEMU trace log (blk_co_preadv/pwritev). Everything up to its median read (in trace order) is the
    /// training window, imported with <see cref="HeatImport"/>; the reads after it are replayed.
    /// Requests beyond <paramref name="size"/> are folded into it (only for the small --quick image).
    /// </summary>
    public static Workload? QemuTrace(string path, long size)
    {
        if (!File.Exists(path))
        {
            return null;
        }
        var lines = new List<(string Line, IoRequest Req)>();
        foreach (var line in File.ReadLines(path))
        {
            var m = TraceLine.Match(line);
            if (!m.Success)
            {
                continue;
            }
            var off = long.Parse(m.Groups[2].Value, CultureInfo.InvariantCulture);
            var len = (int)Math.Min(long.Parse(m.Groups[3].Value, CultureInfo.InvariantCulture), 1 << 20);
            if (len <= 0)
            {
                continue;
            }
            if (off + len > size)
            {
                off = off % size / Block * Block;
                if (off + len > size)
                {
                    off = size - len;
                }
            }
            lines.Add((line, new IoRequest(m.Groups[1].Value == "pwritev", off, len)));
        }
        if (lines.Count < 10)
        {
            return null;
        }
        // Split at the median read: the training window is everything before it (for the traces the
        // script records: the whole mke2fs -d, then the first half of the reading sessions), the test
        // window is the reads after it. Splitting the request count in half instead would train on
        // the file system's creation (nearly all writes) and test on reads only.
        var reads = lines.Count(l => !l.Req.Write);
        var half = lines.Count / 2;
        for (int i = 0, seen = 0; i < lines.Count; i++)
        {
            if (!lines[i].Req.Write && ++seen > reads / 2)
            {
                half = i;
                break;
            }
        }
        var sb = new StringBuilder();
        for (var i = 0; i < half; i++)
        {
            var r = lines[i].Req;
            sb.Append("blk_co_").Append(r.Write ? "pwritev" : "preadv").Append(" blk 0x1 bs 0x2 offset ")
              .Append(r.Offset.ToString(CultureInfo.InvariantCulture)).Append(" bytes ")
              .Append(r.Length.ToString(CultureInfo.InvariantCulture)).Append(" flags 0x0\n");
        }
        var test = lines.Skip(half).Select(l => l.Req).Where(r => !r.Write).ToList();
        return new Workload
        {
            Name = "qemu-trace",
            Description = $"QEMU trace log {Path.GetFileName(path)} ({lines.Count} requests, {reads} reads): the requests up to the median read (reads and writes: {half}) train, the {reads - reads / 2} reads after it are replayed",
            TrainTrace = sb.ToString(),
            Test = test,
        };
    }
}
