using BenchmarkDotNet.Attributes;
using Microsoft.Win32.SafeHandles;

namespace QcowTier.Benchmarks;

/// <summary>
/// A sparse image with thousands of L2 tables: 1 TiB virtual (64 KiB clusters: 2,048 L2 tables),
/// one 4 KiB block written in each 512 MiB range plus as many more at random places; with --smoke
/// (QCOWTIER_BENCH_SMOKE=1) 16 GiB (32 L2 tables). Built once per process.
/// </summary>
internal sealed class ManyL2Fixture
{
    private static readonly Lazy<ManyL2Fixture> Instance = new(() => new ManyL2Fixture());

    private ManyL2Fixture()
    {
        Dir = BenchFixture.NewTempDir("manyl2");
        Path = System.IO.Path.Combine(Dir, "sparse.qcow2");
        Size = TierSizes.Smoke ? 16L << 30 : 1L << 40;
        const long span = 512L << 20; // guest bytes one L2 table maps
        var tables = Size / span;
        var rng = new Random(53);
        var data = BenchFixture.RandomBytes(4096, 59);
        var blocks = new List<long>();
        for (long t = 0; t < tables; t++)
        {
            blocks.Add(t * span + rng.NextInt64(span / 4096) * 4096);
            blocks.Add(rng.NextInt64(Size / 4096) * 4096);
        }
        using (var img = QcowImage.Create(Path, Size))
        {
            foreach (var b in blocks)
            {
                img.Write(b, data);
            }
            img.Flush();
        }
        Blocks = [.. blocks];
        L2Tables = tables;
        AppDomain.CurrentDomain.ProcessExit += (_, _) => BenchFixture.TryDelete(Dir);
    }

    public static ManyL2Fixture Shared => Instance.Value;

    public string Dir { get; }

    public string Path { get; }

    public long Size { get; }

    public long L2Tables { get; }

    /// <summary>Guest offsets of the written 4 KiB blocks, in write order (table by table, interleaved with random ones).</summary>
    public long[] Blocks { get; }
}

/// <summary>
/// L1/L2 lookup over an image with thousands of L2 tables (<see cref="ManyL2Fixture"/>): the whole
/// map (<c>GetMap</c>, every L2 table walked) and the tier placement (<c>GetPlacement</c>), per call.
/// </summary>
[MemoryDiagnoser]
[BenchmarkCategory("MapManyL2")]
public class MapManyL2
{
    private QcowImage _img = null!;

    [GlobalSetup]
    public void Setup()
    {
        var f = ManyL2Fixture.Shared;
        _img = QcowImage.Open(f.Path, new QcowOpenOptions { ReadOnly = true });
        Console.WriteLine($"// MapManyL2: {f.Size >> 30} GiB virtual, {f.L2Tables} L2 tables, {_img.GetMap().Count} map extents");
    }

    [GlobalCleanup]
    public void Cleanup() => _img.Dispose();

    [Benchmark(Baseline = true)]
    public int GetMap() => _img.GetMap().Count;

    [Benchmark]
    public int GetPlacement() => _img.GetPlacement().Count;
}

/// <summary>
/// 4 KiB reads (page cache) of the written blocks of <see cref="ManyL2Fixture"/> in random order, so
/// nearly every read needs a different L2 table than the one before (the default L2 cache holds far
/// fewer than 2,048 tables): the L2 lookup with cache misses. <c>HostPread</c> (baseline) reads the same
/// host offsets of the qcow2 file directly, without the engine. <c>L2CacheMb</c>: 0 = the default L2
/// cache size (misses on nearly every read), 160 = big enough for every table of the 1 TiB image
/// (hits once warm), which separates the cost of a miss from the lookup itself.
/// </summary>
[MemoryDiagnoser]
[BenchmarkCategory("L2LookupRead4K")]
[BytesPerOperation(4096)]
public class L2LookupRead4K
{
    private const int Ops = 256;
    private QcowImage _img = null!;
    private SafeFileHandle _file = null!;
    private long[] _guest = null!;
    private long[] _host = null!;
    private byte[] _buf = null!;
    private int _next;

    [Params(0, 160)]
    public int L2CacheMb { get; set; }

    [GlobalSetup]
    public void Setup()
    {
        var f = ManyL2Fixture.Shared;
        _img = QcowImage.Open(f.Path, new QcowOpenOptions { ReadOnly = true, L2CacheSize = (long)L2CacheMb << 20 });
        _file = BenchFixture.OpenRaw(f.Path, writable: false);
        var rng = new Random(61);
        var order = (long[])f.Blocks.Clone();
        rng.Shuffle(order);
        var n = 1;
        while (n * 2 <= order.Length)
        {
            n *= 2;
        }
        _guest = order[..n];
        _host = new long[n];
        var map = _img.GetMap();
        for (var i = 0; i < n; i++)
        {
            var g = _guest[i];
            var e = map.First(x => x.Start <= g && g < x.Start + x.Length);
            _host[i] = e.HostOffset is { } h ? h + (g - e.Start) : throw new InvalidOperationException($"block {g} is not allocated");
        }
        _buf = GC.AllocateUninitializedArray<byte>(4096, pinned: true);
    }

    [GlobalCleanup]
    public void Cleanup()
    {
        _img.Dispose();
        _file.Dispose();
    }

    [Benchmark(Baseline = true, OperationsPerInvoke = Ops)]
    public int HostPread()
    {
        var i = _next;
        for (var k = 0; k < Ops; k++)
        {
            RandomAccess.Read(_file, _buf, _host[i]);
            i = (i + 1) & (_host.Length - 1);
        }
        _next = i;
        return _buf[0];
    }

    [Benchmark(OperationsPerInvoke = Ops)]
    public int Qcow()
    {
        var i = _next;
        for (var k = 0; k < Ops; k++)
        {
            _img.Read(_guest[i], _buf);
            i = (i + 1) & (_guest.Length - 1);
        }
        _next = i;
        return _buf[0];
    }
}

/// <summary>
/// Heat recording alone, without I/O: <see cref="HeatMap.RecordRead"/>, <see cref="HeatMap.RecordWrite"/>
/// and <see cref="HeatMap.Record"/> with a timestamp, for 4 KiB requests at random offsets of a 1 TiB
/// map (64 KiB clusters), against a baseline of one <see cref="Interlocked.Increment(ref int)"/> per
/// request on a dense counter array (the least a lock-free recorder could do). Recording through the
/// image is <see cref="HeatRecordingRead4K"/>.
/// </summary>
[MemoryDiagnoser]
[BenchmarkCategory("HeatRecord")]
public class HeatRecordOnly
{
    private const int Ops = 1024;
    private HeatMap _heat = null!;
    private int[] _counters = null!;
    private long[] _offsets = null!;
    private int _next;
    private DateTimeOffset _when;

    [GlobalSetup]
    public void Setup()
    {
        var size = TierSizes.Smoke ? 16L << 30 : 1L << 40;
        _heat = new HeatMap(size, 65536);
        _counters = new int[size / 65536];
        _offsets = BenchFixture.RandomOffsets(size, 4096, 1 << 16, 67);
        _when = DateTimeOffset.UtcNow;
        // Touch every offset once so the timed part measures recording, not first-touch growth.
        foreach (var o in _offsets)
        {
            _heat.RecordRead(o, 4096);
        }
    }

    [Benchmark(Baseline = true, OperationsPerInvoke = Ops)]
    public int InterlockedCounter()
    {
        var i = _next;
        for (var k = 0; k < Ops; k++)
        {
            Interlocked.Increment(ref _counters[_offsets[i] >> 16]);
            i = (i + 1) & (_offsets.Length - 1);
        }
        _next = i;
        return i;
    }

    [Benchmark(OperationsPerInvoke = Ops)]
    public int RecordRead()
    {
        var i = _next;
        for (var k = 0; k < Ops; k++)
        {
            _heat.RecordRead(_offsets[i], 4096);
            i = (i + 1) & (_offsets.Length - 1);
        }
        _next = i;
        return i;
    }

    [Benchmark(OperationsPerInvoke = Ops)]
    public int RecordWrite()
    {
        var i = _next;
        for (var k = 0; k < Ops; k++)
        {
            _heat.RecordWrite(_offsets[i], 4096);
            i = (i + 1) & (_offsets.Length - 1);
        }
        _next = i;
        return i;
    }

    [Benchmark(OperationsPerInvoke = Ops)]
    public int RecordWithTime()
    {
        var i = _next;
        for (var k = 0; k < Ops; k++)
        {
            _heat.Record(false, _offsets[i], 4096, _when);
            i = (i + 1) & (_offsets.Length - 1);
        }
        _next = i;
        return i;
    }
}
