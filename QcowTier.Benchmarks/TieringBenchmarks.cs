using System.Globalization;
using BenchmarkDotNet.Attributes;
using Microsoft.Win32.SafeHandles;

namespace QcowTier.Benchmarks;

/// <summary>
/// Sizes for the tiering benchmarks. QCOWTIER_BENCH_MOVE_MB (default 256; 1024 for the "1 GiB" run)
/// is the number of MiB moved per move/apply invocation; QCOWTIER_BENCH_SMOKE=1 (set by --smoke)
/// shrinks everything so the CI smoke stays short.
/// </summary>
internal static class TierSizes
{
    public static bool Smoke => Environment.GetEnvironmentVariable("QCOWTIER_BENCH_SMOKE") == "1";

    public static long MoveBytes
    {
        get
        {
            var s = Environment.GetEnvironmentVariable("QCOWTIER_BENCH_MOVE_MB");
            var mb = !string.IsNullOrEmpty(s) ? long.Parse(s, CultureInfo.InvariantCulture) : Smoke ? 8 : 256;
            return mb << 20;
        }
    }
}

/// <summary>
/// A plain and a tiered private copy of the fixture's qcow2 image, same guest bytes. The tiered copy
/// has a data file next to it (same local disk) and every other 1 MiB guest range moved to HDD, so
/// random I/O hits both tiers about equally.
/// </summary>
public abstract class TieredVsPlainBase
{
    private string _dir = null!;
    private string _dir2 = null!;
    protected QcowImage Plain { get; private set; } = null!;
    protected QcowImage Tiered { get; private set; } = null!;
    protected byte[] Buf { get; private set; } = null!;
    protected long[] Offsets { get; private set; } = null!;

    [GlobalSetup]
    public void Setup()
    {
        var f = BenchFixture.Shared;
        var (_, plain, dir) = f.CopyForWriting(GetType().Name + "-plain");
        var (_, tiered, dir2) = f.CopyForWriting(GetType().Name + "-tiered");
        _dir = dir;
        _dir2 = dir2;
        Plain = QcowImage.Open(plain);
        Tiered = QcowImage.Open(tiered);
        Tiered.AttachTier(new QcowTierOptions { DataFile = "disk.hdd" });
        for (long off = 0; off < f.SizeBytes; off += 2 << 20)
        {
            Tiered.MoveToTier(off, 1 << 20, StorageTier.Hdd);
        }
        Tiered.Flush();
        var usage = Tiered.GetTierUsage();
        if (usage.HddBytes == 0 || usage.SsdBytes == 0)
        {
            throw new InvalidOperationException($"tiered copy is not split across tiers: {usage}");
        }
        Buf = BenchFixture.RandomBytes(4096, 31);
        Offsets = BenchFixture.RandomOffsets(f.SizeBytes, 4096, 1 << 16, 37);
    }

    [GlobalCleanup]
    public void Cleanup()
    {
        Plain.Dispose();
        Tiered.Dispose();
        BenchFixture.TryDelete(_dir);
        BenchFixture.TryDelete(_dir2);
    }
}

/// <summary>4 KiB random reads, page cache: tiered image (data on both tiers) vs plain image. Goal: Tiered ≤ 1.05× Plain.</summary>
[MemoryDiagnoser]
[BenchmarkCategory("TierRandomRead4K")]
[BytesPerOperation(4096)]
public class TieredRandomRead4K : TieredVsPlainBase
{
    private const int Ops = 256;
    private int _next;

    [Benchmark(Baseline = true, OperationsPerInvoke = Ops)]
    public int Plain4K() => Run(Plain);

    [Benchmark(OperationsPerInvoke = Ops)]
    public int Tiered4K() => Run(Tiered);

    private int Run(QcowImage img)
    {
        var offsets = Offsets;
        var i = _next;
        for (var k = 0; k < Ops; k++)
        {
            img.Read(offsets[i], Buf);
            i = (i + 1) & (offsets.Length - 1);
        }
        _next = i;
        return Buf[0];
    }
}

/// <summary>4 KiB random in-place writes, page cache: tiered image (data on both tiers) vs plain. Goal: Tiered ≤ 1.05× Plain.</summary>
[MemoryDiagnoser]
[BenchmarkCategory("TierRandomWrite4K")]
[BytesPerOperation(4096)]
public class TieredRandomWrite4K : TieredVsPlainBase
{
    private const int Ops = 256;
    private int _next;

    [Benchmark(Baseline = true, OperationsPerInvoke = Ops)]
    public int Plain4K() => Run(Plain);

    [Benchmark(OperationsPerInvoke = Ops)]
    public int Tiered4K() => Run(Tiered);

    private int Run(QcowImage img)
    {
        var offsets = Offsets;
        var i = _next;
        for (var k = 0; k < Ops; k++)
        {
            img.Write(offsets[i], Buf);
            i = (i + 1) & (offsets.Length - 1);
        }
        _next = i;
        return i;
    }
}

/// <summary>
/// 4 KiB random reads (page cache) on the fixture's image with <see cref="QcowImage.HeatRecorder"/>
/// set vs not set (two read-only handles on the same file). Goal: Heat ≤ 1.05× NoHeat.
/// </summary>
[MemoryDiagnoser]
[BenchmarkCategory("HeatRead4K")]
[BytesPerOperation(4096)]
public class HeatRecordingRead4K
{
    private const int Ops = 256;
    private QcowImage _plain = null!;
    private QcowImage _heat = null!;
    private byte[] _buf = null!;
    private long[] _offsets = null!;
    private int _next;

    [GlobalSetup]
    public void Setup()
    {
        var f = BenchFixture.Shared;
        _plain = QcowImage.Open(f.QcowPath, new QcowOpenOptions { ReadOnly = true });
        _heat = QcowImage.Open(f.QcowPath, new QcowOpenOptions { ReadOnly = true });
        _heat.HeatRecorder = new HeatMap(_heat.Size, _heat.ClusterSize, imageId: _heat.HeatIdentity);
        _buf = GC.AllocateUninitializedArray<byte>(4096, pinned: true);
        _offsets = BenchFixture.RandomOffsets(f.SizeBytes, 4096, 1 << 16, 41);
    }

    [GlobalCleanup]
    public void Cleanup()
    {
        _plain.Dispose();
        _heat.Dispose();
    }

    [Benchmark(Baseline = true, OperationsPerInvoke = Ops)]
    public int NoHeat() => Run(_plain);

    [Benchmark(OperationsPerInvoke = Ops)]
    public int Heat() => Run(_heat);

    private int Run(QcowImage img)
    {
        var offsets = _offsets;
        var i = _next;
        for (var k = 0; k < Ops; k++)
        {
            img.Read(offsets[i], _buf);
            i = (i + 1) & (offsets.Length - 1);
        }
        _next = i;
        return _buf[0];
    }
}

/// <summary>
/// A template tiered image of 2×<see cref="TierSizes.MoveBytes"/> (64 KiB clusters, random data) whose
/// even clusters are on HDD and odd clusters on SSD, both files in one temp dir on the same disk;
/// every iteration starts from a fresh, fsynced copy (IterationSetup, untimed). Also a source file of
/// MoveBytes for the sequential-copy baseline.
/// </summary>
public abstract class MoveBase
{
    protected const int Cluster = 65536;
    private string _dir = null!;
    private string _tplPrimary = null!;
    private string _tplHdd = null!;
    private int _iter;
    protected string CopySource { get; private set; } = null!;
    protected string CopyDest { get; private set; } = null!;
    protected long Bytes { get; private set; }
    protected QcowImage? Image { get; private set; }
    protected string ImagePath { get; private set; } = null!;

    /// <summary>Clusters moved per invocation; the benchmarks report ns per 64 KiB cluster.</summary>
    protected static int ClustersPerInvoke => (int)(TierSizes.MoveBytes / Cluster);

    [GlobalSetup]
    public void Setup()
    {
        Bytes = TierSizes.MoveBytes;
        _dir = BenchFixture.NewTempDir(GetType().Name);
        _tplPrimary = Path.Combine(_dir, "tpl.qcow2");
        _tplHdd = Path.Combine(_dir, "tpl.hdd");
        var size = 2 * Bytes;
        var buf = new byte[Cluster];
        var rng = new Random(43);
        using (var img = QcowImage.Create(_tplPrimary, size, new QcowCreateOptions
        {
            Tier = new QcowTierOptions { DataFile = "tpl.hdd", DefaultTier = StorageTier.Hdd },
        }))
        {
            for (long c = 0; c < size / Cluster; c += 2)
            {
                rng.NextBytes(buf);
                img.Write(c * Cluster, buf);
            }
            img.SetTierPolicy(StorageTier.Ssd, 0);
            for (long c = 1; c < size / Cluster; c += 2)
            {
                rng.NextBytes(buf);
                img.Write(c * Cluster, buf);
            }
            img.Flush();
            var u = img.GetTierUsage();
            if (u.HddBytes != Bytes || u.SsdBytes != Bytes)
            {
                throw new InvalidOperationException($"template split is wrong: {u}");
            }
        }
        CopySource = Path.Combine(_dir, "copy-src.bin");
        using (var h = File.OpenHandle(CopySource, FileMode.CreateNew, FileAccess.ReadWrite))
        {
            for (long off = 0; off < Bytes; off += Cluster)
            {
                rng.NextBytes(buf);
                RandomAccess.Write(h, buf, off);
            }
            RandomAccess.FlushToDisk(h);
        }
        CopyDest = Path.Combine(_dir, "copy-dst.bin");
        OnSetup();
    }

    protected virtual void OnSetup()
    {
    }

    /// <summary>Fresh copies of the template, fsynced so writeback of the copy does not land in the measurement.</summary>
    protected void ResetImage()
    {
        Image?.Dispose();
        foreach (var p in Directory.GetFiles(_dir, "work-*"))
        {
            File.Delete(p);
        }
        var n = _iter++;
        var hddName = $"work-{n}.hdd";
        ImagePath = Path.Combine(_dir, $"work-{n}.qcow2");
        File.Copy(_tplHdd, Path.Combine(_dir, hddName));
        File.Copy(_tplPrimary, ImagePath);
        foreach (var p in new[] { ImagePath, Path.Combine(_dir, hddName) })
        {
            using var h = File.OpenHandle(p, FileMode.Open, FileAccess.ReadWrite);
            RandomAccess.FlushToDisk(h);
        }
        // The primary names its data file "tpl.hdd": point it at the copy.
        Image = QcowImage.Open(ImagePath, new QcowOpenOptions { TierDataFile = Path.Combine(_dir, hddName) });
    }

    protected void ResetCopy()
    {
        File.Delete(CopyDest);
    }

    /// <summary>Sequential copy of MoveBytes between two files with RandomAccess (1 MiB I/Os), then fsync.</summary>
    protected int SequentialCopy(long bytes)
    {
        var buf = GC.AllocateUninitializedArray<byte>(1 << 20, pinned: true);
        using var src = File.OpenHandle(CopySource, FileMode.Open, FileAccess.Read);
        using var dst = File.OpenHandle(CopyDest, FileMode.CreateNew, FileAccess.ReadWrite);
        long off = 0;
        while (off < bytes)
        {
            var n = RandomAccess.Read(src, buf.AsSpan(0, (int)Math.Min(buf.Length, bytes - off)), off);
            RandomAccess.Write(dst, buf.AsSpan(0, n), off);
            off += n;
        }
        RandomAccess.FlushToDisk(dst);
        return (int)(off >> 20);
    }

    [GlobalCleanup]
    public void Cleanup()
    {
        Image?.Dispose();
        Image = null;
        BenchFixture.TryDelete(_dir);
    }
}

/// <summary>
/// Moving MoveBytes of scattered clusters (every other 64 KiB cluster) between tiers vs a sequential
/// copy of the same bytes (fsync at the end of both; the move flushes the image). One MoveToTier
/// call over the whole image (the engine batches the scattered clusters), HDD→SSD and SSD→HDD.
/// Goal: Move ≤ 2× Copy.
/// </summary>
[MemoryDiagnoser]
[BenchmarkCategory("TierMove")]
public class TierMove : MoveBase
{
    [IterationSetup(Target = nameof(Copy))]
    public void SetupCopy() => ResetCopy();

    [IterationSetup(Targets = [nameof(MoveToSsd), nameof(MoveToHdd)])]
    public void SetupMove() => ResetImage();

    [Benchmark(Baseline = true)]
    public int Copy() => SequentialCopy(Bytes);

    [Benchmark]
    public int MoveToSsd() => Move(StorageTier.Ssd);

    [Benchmark]
    public int MoveToHdd() => Move(StorageTier.Hdd);

    private int Move(StorageTier to)
    {
        var r = Image!.MoveToTier(0, Image.Size, to);
        Image.Flush();
        if (r.BytesMoved != Bytes)
        {
            throw new InvalidOperationException($"moved {r.BytesMoved} bytes, expected {Bytes}");
        }
        return (int)r.ClustersMoved;
    }
}

/// <summary>
/// One MoveToTier call per scattered HDD cluster (what applying a plan of one move per scattered unit
/// does), over 1/8 of MoveBytes, vs a sequential copy of the same bytes (fsync at the end of both).
/// </summary>
[MemoryDiagnoser]
[BenchmarkCategory("TierMovePerCluster")]
public class TierMovePerCluster : MoveBase
{
    private long PartBytes => Math.Max(Cluster, Bytes / 8);

    [IterationSetup(Target = nameof(Copy))]
    public void SetupCopy() => ResetCopy();

    [IterationSetup(Target = nameof(MoveToSsdPerCluster))]
    public void SetupMove() => ResetImage();

    [Benchmark(Baseline = true)]
    public int Copy() => SequentialCopy(PartBytes);

    [Benchmark]
    public int MoveToSsdPerCluster()
    {
        long moved = 0;
        var n = PartBytes / Cluster;
        for (long i = 0; i < n; i++)
        {
            moved += Image!.MoveToTier(2 * i * Cluster, Cluster, StorageTier.Ssd).ClustersMoved;
        }
        Image!.Flush();
        if (moved != n)
        {
            throw new InvalidOperationException($"moved {moved} clusters, expected {n}");
        }
        return (int)moved;
    }
}

/// <summary>
/// Rebalancer.Apply of a plan that promotes every even (HDD) cluster of the template — MoveBytes of
/// scattered clusters — vs a sequential copy of the same bytes (fsync at the end of both).
/// The plan is made once (GlobalSetup) on a copy of the template, from a heat map where only the
/// even clusters are read, with a 100 % SSD budget; every iteration applies it to a fresh copy.
/// </summary>
[MemoryDiagnoser]
[BenchmarkCategory("RebalanceApply")]
public class RebalanceApply : MoveBase
{
    private RebalancePlan _plan = null!;

    protected override void OnSetup()
    {
        ResetImage();
        var img = Image!;
        var heat = new HeatMap(img.Size, img.ClusterSize, imageId: img.HeatIdentity);
        for (long c = 0; c < img.Size / Cluster; c += 2)
        {
            for (var k = 0; k < 4; k++)
            {
                heat.RecordRead(c * Cluster, Cluster);
            }
        }
        _plan = Rebalancer.Plan([new RebalanceInput(img, heat)], new RebalancePolicy { SsdBudgetPercent = 100 });
        if (_plan.BytesToSsd != Bytes || _plan.BytesToHdd != 0)
        {
            throw new InvalidOperationException($"plan moves {_plan.BytesToSsd} B to SSD and {_plan.BytesToHdd} B to HDD, expected {Bytes} and 0 ({_plan.Moves.Count} moves):\n{_plan.Explain()}");
        }
        Console.WriteLine($"// RebalanceApply: plan of {_plan.Moves.Count} moves, {_plan.BytesToSsd >> 20} MiB to SSD");
    }

    [IterationSetup(Target = nameof(Copy))]
    public void SetupCopy() => ResetCopy();

    [IterationSetup(Target = nameof(Apply))]
    public void SetupApply() => ResetImage();

    [Benchmark(Baseline = true)]
    public int Copy() => SequentialCopy(Bytes);

    [Benchmark]
    public int Apply()
    {
        var r = Rebalancer.Apply(_plan, [Image!]);
        Image!.Flush();
        if (r.BytesMoved != Bytes)
        {
            throw new InvalidOperationException($"applied {r.BytesMoved} bytes, expected {Bytes}");
        }
        return r.MovesApplied;
    }
}

/// <summary>
/// Rebalancer.Plan over an image with <see cref="Millions"/>×1M allocated clusters (tiered, created
/// with preallocation=metadata, so every cluster is allocated on HDD and the data file is sparse;
/// 64 KiB clusters) and a heat map where every cluster was read (the hottest 10 % much more). SSD
/// budget 10 %. Baseline: the placement walk and the heat-map scan alone (the plan's inputs).
/// Goal: Plan &lt; 1 s per 10M tracked clusters. Smoke: 1/100 of the clusters.
/// </summary>
[MemoryDiagnoser]
[BenchmarkCategory("RebalancePlan")]
public class RebalancePlanTime
{
    private string _dir = null!;
    private QcowImage _img = null!;
    private HeatMap _heat = null!;

    [Params(1, 10)]
    public int Millions { get; set; }

    [GlobalSetup]
    public void Setup()
    {
        var clusters = Millions * 1_000_000L / (TierSizes.Smoke ? 100 : 1);
        const int cs = 65536;
        _dir = BenchFixture.NewTempDir("plan");
        var sw = System.Diagnostics.Stopwatch.StartNew();
        _img = QcowImage.Create(Path.Combine(_dir, "p.qcow2"), clusters * cs, new QcowCreateOptions
        {
            Preallocation = QcowPreallocation.Metadata,
            Tier = new QcowTierOptions { DataFile = "p.hdd", DefaultTier = StorageTier.Hdd },
        });
        var created = sw.Elapsed;
        _heat = new HeatMap(_img.Size, cs, imageId: _img.HeatIdentity);
        var rng = new Random(47);
        for (long c = 0; c < clusters; c++)
        {
            _heat.RecordRead(c * cs, 4096);
        }
        for (long i = 0; i < clusters; i++)
        {
            _heat.RecordRead(rng.NextInt64(clusters / 10) * cs, 4096);
        }
        var usage = _img.GetTierUsage();
        Console.WriteLine($"// RebalancePlan: {clusters} clusters, image created in {created.TotalSeconds:F1} s, heat built in {(sw.Elapsed - created).TotalSeconds:F1} s; SSD {usage.SsdBytes >> 20} MiB, HDD {usage.HddBytes >> 20} MiB, placement extents {_img.GetPlacement().Count}, heat map {_heat.MemoryBytes >> 20} MiB");
    }

    [GlobalCleanup]
    public void Cleanup()
    {
        _img.Dispose();
        BenchFixture.TryDelete(_dir);
    }

    [IterationSetup]
    public void Collect() => GC.Collect();

    [Benchmark(Baseline = true)]
    public int Inputs()
    {
        long n = 0;
        foreach (var e in _img.GetPlacement())
        {
            n += e.Length;
        }
        foreach (var u in _heat.TouchedUnits())
        {
            n += u.Reads;
        }
        return (int)n;
    }

    [Benchmark]
    public int Plan()
    {
        var plan = Rebalancer.Plan([new RebalanceInput(_img, _heat)], new RebalancePolicy { SsdBudgetPercent = 10 });
        return plan.Moves.Count;
    }
}
