using BenchmarkDotNet.Attributes;
using Microsoft.Win32.SafeHandles;

namespace QcowTier.Benchmarks;

/// <summary>
/// Base for in-place write benchmarks: private copies of the fixture's images (every cluster already
/// allocated with the COPIED flag, so the engine never allocates), written through the page cache.
/// No flush inside the measurement: dirty pages are written back by the kernel in the background,
/// for raw and qcow2 alike (one source of noise).
/// </summary>
public abstract class InPlaceWriteBase
{
    private string _dir = null!;
    protected SafeFileHandle RawHandle { get; private set; } = null!;

    /// <summary>A second handle on the qcow2 copy, for the HostPwrite rows (data clusters only).</summary>
    protected SafeFileHandle HostHandle { get; private set; } = null!;

    /// <summary>Host offset of every guest cluster of the qcow2 copy.</summary>
    protected long[] HostMap { get; private set; } = null!;

    protected QcowImage Image { get; private set; } = null!;
    protected byte[] Data { get; private set; } = null!;
    protected long SizeBytes { get; private set; }

    protected abstract int Block { get; }

    [GlobalSetup]
    public void Setup()
    {
        var f = BenchFixture.Shared;
        var (raw, qcow, dir) = f.CopyForWriting(GetType().Name);
        _dir = dir;
        RawHandle = BenchFixture.OpenRaw(raw, writable: true);
        HostMap = BenchFixture.HostMap(qcow);
        HostHandle = BenchFixture.OpenRaw(qcow, writable: true);
        Image = QcowImage.Open(qcow);
        Data = BenchFixture.RandomBytes(Block, 23);
        SizeBytes = f.SizeBytes;
        OnSetup();
    }

    protected virtual void OnSetup()
    {
    }

    protected long HostOffset(long guestOffset)
        => HostMap[guestOffset / BenchFixture.ClusterSize] + (guestOffset % BenchFixture.ClusterSize);

    [GlobalCleanup]
    public void Cleanup()
    {
        Image.Dispose();
        RawHandle.Dispose();
        HostHandle.Dispose();
        BenchFixture.TryDelete(_dir);
    }
}

/// <summary>4 KiB writes at random 4 KiB-aligned offsets into allocated clusters (in place), page cache.</summary>
[MemoryDiagnoser]
[BenchmarkCategory("RandomWrite4K")]
[BytesPerOperation(4096)]
public class RandomWrite4K : InPlaceWriteBase
{
    private const int Ops = 256;
    private long[] _offsets = null!;
    private long[] _hostOffsets = null!;
    private int _next;

    protected override int Block => 4096;

    protected override void OnSetup()
    {
        _offsets = BenchFixture.RandomOffsets(SizeBytes, Block, 1 << 16, 29);
        _hostOffsets = [.. _offsets.Select(HostOffset)];
    }

    [Benchmark(Baseline = true, OperationsPerInvoke = Ops)]
    public void Raw()
    {
        var i = _next;
        for (var k = 0; k < Ops; k++)
        {
            RandomAccess.Write(RawHandle, Data, _offsets[i]);
            i = (i + 1) & (_offsets.Length - 1);
        }
        _next = i;
    }

    /// <summary>pwrite on the qcow2 file at the mapped host offsets: the engine's syscalls without the engine.</summary>
    [Benchmark(OperationsPerInvoke = Ops)]
    public void HostPwrite()
    {
        var i = _next;
        for (var k = 0; k < Ops; k++)
        {
            RandomAccess.Write(HostHandle, Data, _hostOffsets[i]);
            i = (i + 1) & (_offsets.Length - 1);
        }
        _next = i;
    }

    [Benchmark(OperationsPerInvoke = Ops)]
    public void Qcow()
    {
        var i = _next;
        for (var k = 0; k < Ops; k++)
        {
            Image.Write(_offsets[i], Data);
            i = (i + 1) & (_offsets.Length - 1);
        }
        _next = i;
    }
}

/// <summary>64 KiB writes walking the disk front to back (wrapping) into allocated clusters (in place), page cache.</summary>
[MemoryDiagnoser]
[BenchmarkCategory("SequentialWrite64K")]
[BytesPerOperation(65536)]
public class SequentialWrite64K : InPlaceWriteBase
{
    private const int Ops = 64;
    private long _pos;

    protected override int Block => 65536;

    [Benchmark(Baseline = true, OperationsPerInvoke = Ops)]
    public void Raw()
    {
        for (var k = 0; k < Ops; k++)
        {
            RandomAccess.Write(RawHandle, Data, _pos);
            Advance();
        }
    }

    /// <summary>pwrite on the qcow2 file at the host offset of each guest cluster: the engine's syscalls without the engine.</summary>
    [Benchmark(OperationsPerInvoke = Ops)]
    public void HostPwrite()
    {
        for (var k = 0; k < Ops; k++)
        {
            RandomAccess.Write(HostHandle, Data, HostOffset(_pos));
            Advance();
        }
    }

    [Benchmark(OperationsPerInvoke = Ops)]
    public void Qcow()
    {
        for (var k = 0; k < Ops; k++)
        {
            Image.Write(_pos, Data);
            Advance();
        }
    }

    private void Advance()
    {
        _pos += Block;
        if (_pos >= SizeBytes)
        {
            _pos = 0;
        }
    }
}

/// <summary>Guest order of first-touch writes.</summary>
public enum WriteOrder
{
    Sequential,
    Random,
}

/// <summary>
/// First-touch 64 KiB writes (one whole 64 KiB cluster each) into a fresh, empty image: every write
/// allocates a cluster (refcount update, L2 entry, file growth). Each iteration gets a new 1 GiB
/// qcow2 image and a new sparse 1 GiB raw file and writes <see cref="Ops"/> clusters (64 MiB) to them,
/// in guest order or at random distinct clusters. Raw baseline: the same writes into the sparse
/// file, which allocate file-system blocks. No flush inside the measurement; the image is flushed
/// and closed in IterationCleanup, outside it.
/// </summary>
[MemoryDiagnoser]
[BenchmarkCategory("AllocatingWrite64K")]
[BytesPerOperation(Block)]
public class AllocatingWrite64K
{
    private const int Block = 65536;
    private const int Ops = 1024;
    private const long VirtualSize = 1L << 30;
    private string _dir = null!;
    private byte[] _data = null!;
    private long[] _offsets = null!;
    private SafeFileHandle? _raw;
    private QcowImage? _img;
    private int _iteration;

    [Params(WriteOrder.Sequential, WriteOrder.Random)]
    public WriteOrder Order { get; set; }

    [GlobalSetup]
    public void Setup()
    {
        _dir = BenchFixture.NewTempDir("alloc");
        _data = BenchFixture.RandomBytes(Block, 31);
        _offsets = new long[Ops];
        if (Order == WriteOrder.Sequential)
        {
            for (var i = 0; i < Ops; i++)
            {
                _offsets[i] = (long)i * Block;
            }
        }
        else
        {
            var clusters = Enumerable.Range(0, (int)(VirtualSize / Block)).ToArray();
            new Random(37).Shuffle(clusters);
            for (var i = 0; i < Ops; i++)
            {
                _offsets[i] = (long)clusters[i] * Block;
            }
        }
    }

    [GlobalCleanup]
    public void Cleanup() => BenchFixture.TryDelete(_dir);

    [IterationSetup(Target = nameof(Raw))]
    public void SetupRaw()
    {
        var path = Path.Combine(_dir, $"fresh-{_iteration++}.raw");
        _raw = File.OpenHandle(path, FileMode.CreateNew, FileAccess.ReadWrite, FileShare.ReadWrite, preallocationSize: 0);
        RandomAccess.SetLength(_raw, VirtualSize);
    }

    [IterationCleanup(Target = nameof(Raw))]
    public void CleanupRaw()
    {
        _raw?.Dispose();
        _raw = null;
        DeleteFiles();
    }

    [IterationSetup(Target = nameof(Qcow))]
    public void SetupQcow()
    {
        var path = Path.Combine(_dir, $"fresh-{_iteration++}.qcow2");
        _img = QcowImage.Create(path, VirtualSize, new QcowCreateOptions { ClusterSize = Block });
    }

    [IterationCleanup(Target = nameof(Qcow))]
    public void CleanupQcow()
    {
        _img?.Dispose();
        _img = null;
        DeleteFiles();
    }

    private void DeleteFiles()
    {
        foreach (var f in Directory.EnumerateFiles(_dir))
        {
            File.Delete(f);
        }
    }

    [Benchmark(Baseline = true, OperationsPerInvoke = Ops)]
    public void Raw()
    {
        foreach (var off in _offsets)
        {
            RandomAccess.Write(_raw!, _data, off);
        }
    }

    [Benchmark(OperationsPerInvoke = Ops)]
    public void Qcow()
    {
        foreach (var off in _offsets)
        {
            _img!.Write(off, _data);
        }
    }
}

/// <summary>
/// A 4 KiB in-place write made durable at once (write + flush), as a guest issuing a FUA/flush after
/// every write does. Raw: pwrite + fdatasync, which is what QEMU's file driver issues for a flush.
/// RawFsync: pwrite + fsync, what <see cref="RandomAccess.FlushToDisk"/> (and so the engine's flush) issues;
/// the difference is the cost of journaling the inode's mtime. Device-bound, so noisy on a shared disk.
/// </summary>
[MemoryDiagnoser]
[BenchmarkCategory("WriteFlush4K")]
[BytesPerOperation(4096)]
public partial class WriteFlush4K : InPlaceWriteBase
{
    private const int Ops = 8;
    private long[] _offsets = null!;
    private int _next;

    protected override int Block => 4096;

    protected override void OnSetup() => _offsets = BenchFixture.RandomOffsets(SizeBytes, Block, 1 << 12, 41);

    [System.Runtime.InteropServices.LibraryImport("libc", EntryPoint = "fdatasync", SetLastError = true)]
    private static partial int FDataSync(SafeFileHandle fd);

    [Benchmark(Baseline = true, OperationsPerInvoke = Ops)]
    public void Raw()
    {
        for (var k = 0; k < Ops; k++)
        {
            RandomAccess.Write(RawHandle, Data, NextOffset());
            if (FDataSync(RawHandle) != 0)
            {
                throw new IOException("fdatasync failed");
            }
        }
    }

    [Benchmark(OperationsPerInvoke = Ops)]
    public void RawFsync()
    {
        for (var k = 0; k < Ops; k++)
        {
            RandomAccess.Write(RawHandle, Data, NextOffset());
            RandomAccess.FlushToDisk(RawHandle);
        }
    }

    [Benchmark(OperationsPerInvoke = Ops)]
    public void Qcow()
    {
        for (var k = 0; k < Ops; k++)
        {
            Image.Write(NextOffset(), Data);
            Image.Flush();
        }
    }

    private long NextOffset()
    {
        var i = _next;
        _next = (i + 1) & (_offsets.Length - 1);
        return _offsets[i];
    }
}
