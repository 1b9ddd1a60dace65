using BenchmarkDotNet.Attributes;
using Microsoft.Win32.SafeHandles;

namespace QcowTier.Benchmarks;

/// <summary>
/// 4 KiB reads at random 4 KiB-aligned guest offsets, page cache (cache=writeback).
/// Raw: pread on a raw file with the same bytes. Goal: Qcow throughput ≥ 0.8× raw (Ratio ≤ 1.25), 0 B allocated.
/// </summary>
[MemoryDiagnoser]
[BenchmarkCategory("RandomRead4K")]
[BytesPerOperation(Block)]
public class RandomRead4K
{
    private const int Block = 4096;
    private const int Ops = 256;
    private SafeFileHandle _raw = null!;
    private QcowImage _img = null!;
    private byte[] _buf = null!;
    private SafeFileHandle _host = null!;
    private long[] _offsets = null!;
    private long[] _hostOffsets = null!;
    private int _next;

    [GlobalSetup]
    public void Setup()
    {
        var f = BenchFixture.Shared;
        _raw = BenchFixture.OpenRaw(f.RawPath, writable: false);
        _host = BenchFixture.OpenRaw(f.QcowPath, writable: false);
        _img = QcowImage.Open(f.QcowPath, new QcowOpenOptions { ReadOnly = true });
        _buf = GC.AllocateUninitializedArray<byte>(Block, pinned: true);
        _offsets = BenchFixture.RandomOffsets(f.SizeBytes, Block, 1 << 16, 11);
        var map = BenchFixture.HostMap(f.QcowPath);
        _hostOffsets = [.. _offsets.Select(o => map[o / BenchFixture.ClusterSize] + (o % BenchFixture.ClusterSize))];
    }

    [GlobalCleanup]
    public void Cleanup()
    {
        _img.Dispose();
        _raw.Dispose();
        _host.Dispose();
    }

    /// <summary>pread on the qcow2 file at the host offsets the engine maps to: the engine's cost without the engine.</summary>
    [Benchmark(OperationsPerInvoke = Ops)]
    public int HostPread()
    {
        var n = 0;
        var offsets = _hostOffsets;
        var i = _next;
        for (var k = 0; k < Ops; k++)
        {
            n += RandomAccess.Read(_host, _buf, offsets[i]);
            i = (i + 1) & (offsets.Length - 1);
        }
        _next = i;
        return n;
    }

    [Benchmark(Baseline = true, OperationsPerInvoke = Ops)]
    public int Raw()
    {
        var n = 0;
        var offsets = _offsets;
        var i = _next;
        for (var k = 0; k < Ops; k++)
        {
            n += RandomAccess.Read(_raw, _buf, offsets[i]);
            i = (i + 1) & (offsets.Length - 1);
        }
        _next = i;
        return n;
    }

    [Benchmark(OperationsPerInvoke = Ops)]
    public int Qcow()
    {
        var offsets = _offsets;
        var i = _next;
        for (var k = 0; k < Ops; k++)
        {
            _img.Read(offsets[i], _buf);
            i = (i + 1) & (offsets.Length - 1);
        }
        _next = i;
        return _buf[0];
    }
}

/// <summary>64 KiB reads walking the disk front to back (wrapping), page cache. One cluster per read.</summary>
[MemoryDiagnoser]
[BenchmarkCategory("SequentialRead64K")]
[BytesPerOperation(Block)]
public class SequentialRead64K
{
    private const int Block = 65536;
    private const int Ops = 64;
    private SafeFileHandle _raw = null!;
    private QcowImage _img = null!;
    private byte[] _buf = null!;
    private SafeFileHandle _host = null!;
    private long[] _map = null!;
    private long _size;
    private long _pos;

    [GlobalSetup]
    public void Setup()
    {
        var f = BenchFixture.Shared;
        _raw = BenchFixture.OpenRaw(f.RawPath, writable: false);
        _host = BenchFixture.OpenRaw(f.QcowPath, writable: false);
        _img = QcowImage.Open(f.QcowPath, new QcowOpenOptions { ReadOnly = true });
        _buf = GC.AllocateUninitializedArray<byte>(Block, pinned: true);
        _size = f.SizeBytes;
        _map = BenchFixture.HostMap(f.QcowPath);
    }

    [GlobalCleanup]
    public void Cleanup()
    {
        _img.Dispose();
        _raw.Dispose();
        _host.Dispose();
    }

    /// <summary>pread on the qcow2 file at the host offset of each guest cluster: the engine's cost without the engine.</summary>
    [Benchmark(OperationsPerInvoke = Ops)]
    public int HostPread()
    {
        var n = 0;
        for (var k = 0; k < Ops; k++)
        {
            n += RandomAccess.Read(_host, _buf, _map[_pos / Block]);
            _pos += Block;
            if (_pos >= _size)
            {
                _pos = 0;
            }
        }
        return n;
    }

    [Benchmark(Baseline = true, OperationsPerInvoke = Ops)]
    public int Raw()
    {
        var n = 0;
        for (var k = 0; k < Ops; k++)
        {
            n += RandomAccess.Read(_raw, _buf, _pos);
            _pos += Block;
            if (_pos >= _size)
            {
                _pos = 0;
            }
        }
        return n;
    }

    [Benchmark(OperationsPerInvoke = Ops)]
    public int Qcow()
    {
        for (var k = 0; k < Ops; k++)
        {
            _img.Read(_pos, _buf);
            _pos += Block;
            if (_pos >= _size)
            {
                _pos = 0;
            }
        }
        return _buf[0];
    }
}

/// <summary>
/// 4 KiB random reads with cache=none (O_DIRECT) into an aligned buffer: both sides go to the device,
/// so this measures the engine's overhead on top of real I/O latency (noisy on a shared VM disk).
/// QcowUnaligned reads into an ordinary managed array (not 4 KiB-aligned), which the engine must
/// bounce through an aligned buffer.
/// </summary>
[MemoryDiagnoser]
[BenchmarkCategory("DirectRandomRead4K")]
[BytesPerOperation(Block)]
public class DirectRandomRead4K
{
    private const int Block = 4096;
    private const int Ops = 64;
    private SafeFileHandle _raw = null!;
    private QcowImage _img = null!;
    private AlignedBuffer _buf = null!;
    private byte[] _managed = null!;
    private int _unalignedStart;
    private long[] _offsets = null!;
    private int _next;

    [GlobalSetup]
    public void Setup()
    {
        var f = BenchFixture.Shared;
        _raw = BenchFixture.OpenRawDirect(f.RawPath, writable: false);
        _img = QcowImage.Open(f.QcowPath, new QcowOpenOptions { ReadOnly = true, CacheMode = QcowCacheMode.None });
        _buf = new AlignedBuffer(Block);
        _managed = GC.AllocateUninitializedArray<byte>(2 * Block, pinned: true);
        unsafe
        {
            fixed (byte* p = _managed)
            {
                // Start 16 bytes past a 4 KiB boundary: like any byte[], never aligned for O_DIRECT.
                _unalignedStart = (int)((4096 + 16 - ((nint)p & 4095)) & 4095);
            }
        }
        _offsets = BenchFixture.RandomOffsets(f.SizeBytes, Block, 1 << 16, 13);
    }

    [GlobalCleanup]
    public void Cleanup()
    {
        _img.Dispose();
        _raw.Dispose();
        _buf.Dispose();
    }

    [Benchmark(Baseline = true, OperationsPerInvoke = Ops)]
    public int Raw()
    {
        var n = 0;
        var offsets = _offsets;
        var i = _next;
        var span = _buf.Span;
        for (var k = 0; k < Ops; k++)
        {
            n += RandomAccess.Read(_raw, span, offsets[i]);
            i = (i + 1) & (offsets.Length - 1);
        }
        _next = i;
        return n;
    }

    [Benchmark(OperationsPerInvoke = Ops)]
    public int Qcow()
    {
        var offsets = _offsets;
        var i = _next;
        var span = _buf.Span;
        for (var k = 0; k < Ops; k++)
        {
            _img.Read(offsets[i], span);
            i = (i + 1) & (offsets.Length - 1);
        }
        _next = i;
        return span[0];
    }

    [Benchmark(OperationsPerInvoke = Ops)]
    public int QcowUnaligned()
    {
        var offsets = _offsets;
        var i = _next;
        var span = _managed.AsSpan(_unalignedStart, Block);
        for (var k = 0; k < Ops; k++)
        {
            _img.Read(offsets[i], span);
            i = (i + 1) & (offsets.Length - 1);
        }
        _next = i;
        return span[0];
    }
}

/// <summary>
/// 4 KiB random reads, 16 in flight (16 async loops sharing one image), page cache.
/// Raw: <see cref="RandomAccess.ReadAsync(SafeFileHandle, Memory{byte}, long, CancellationToken)"/> on the raw file.
/// Two diagnostic rows split the engine's cost: HostReadAsync (RandomAccess.ReadAsync on the qcow2
/// file at the mapped host offsets) and StorageReadAsync (the engine's own file storage layer at those
/// offsets, without the L1/L2 lookup). The harness's own allocations (16 loop state machines and a
/// WhenAll per invocation of <see cref="Ops"/> reads) appear in every row.
/// </summary>
[MemoryDiagnoser]
[BenchmarkCategory("AsyncRandomRead4KQd16")]
[BytesPerOperation(Block)]
public class AsyncRandomRead4KQd16
{
    private const int Block = 4096;
    private const int Depth = 16;
    private const int PerWorker = 64;
    private const int Ops = Depth * PerWorker;
    private SafeFileHandle _raw = null!;
    private SafeFileHandle _host = null!;
    private QcowImage _img = null!;
    private Memory<byte>[] _bufs = null!;
    private long[] _offsets = null!;
    private long[] _hostOffsets = null!;
    private readonly Task[] _workers = new Task[Depth];
    private int _round;

    [GlobalSetup]
    public void Setup()
    {
        var f = BenchFixture.Shared;
        _raw = BenchFixture.OpenRaw(f.RawPath, writable: false);
        _host = BenchFixture.OpenRaw(f.QcowPath, writable: false);
        _img = QcowImage.Open(f.QcowPath, new QcowOpenOptions { ReadOnly = true });
        _bufs = new Memory<byte>[Depth];
        for (var i = 0; i < Depth; i++)
        {
            _bufs[i] = GC.AllocateUninitializedArray<byte>(Block, pinned: true);
        }
        _offsets = BenchFixture.RandomOffsets(f.SizeBytes, Block, 1 << 16, 17);
        var map = BenchFixture.HostMap(f.QcowPath);
        _hostOffsets = [.. _offsets.Select(o => map[o / BenchFixture.ClusterSize] + (o % BenchFixture.ClusterSize))];
    }

    [GlobalCleanup]
    public void Cleanup()
    {
        _img.Dispose();
        _raw.Dispose();
        _host.Dispose();
    }

    [Benchmark(Baseline = true, OperationsPerInvoke = Ops)]
    public Task Raw() => Run(0);

    [Benchmark(OperationsPerInvoke = Ops)]
    public Task HostReadAsync() => Run(1);

    [Benchmark(OperationsPerInvoke = Ops)]
    public Task StorageReadAsync() => Run(2);

    [Benchmark(OperationsPerInvoke = Ops)]
    public Task Qcow() => Run(3);

    private Task Run(int kind)
    {
        var r = _round;
        _round = (r + 1) & ((_offsets.Length / Ops) - 1);
        var baseIndex = r * Ops;
        for (var w = 0; w < Depth; w++)
        {
            _workers[w] = kind switch
            {
                0 => RawWorker(_raw, _offsets, w, baseIndex),
                1 => RawWorker(_host, _hostOffsets, w, baseIndex),
                2 => StorageWorker(w, baseIndex),
                _ => QcowWorker(w, baseIndex),
            };
        }
        return Task.WhenAll(_workers);
    }

    private async Task RawWorker(SafeFileHandle handle, long[] offsets, int w, int baseIndex)
    {
        var buf = _bufs[w];
        for (var k = 0; k < PerWorker; k++)
        {
            await RandomAccess.ReadAsync(handle, buf, offsets[baseIndex + k * Depth + w]).ConfigureAwait(false);
        }
    }

    private async Task StorageWorker(int w, int baseIndex)
    {
        var buf = _bufs[w];
        var storage = _img.Core.File;
        for (var k = 0; k < PerWorker; k++)
        {
            await storage.ReadAsync(_hostOffsets[baseIndex + k * Depth + w], buf, CancellationToken.None).ConfigureAwait(false);
        }
    }

    private async Task QcowWorker(int w, int baseIndex)
    {
        var buf = _bufs[w];
        for (var k = 0; k < PerWorker; k++)
        {
            await _img.ReadAsync(_offsets[baseIndex + k * Depth + w], buf).ConfigureAwait(false);
        }
    }
}
