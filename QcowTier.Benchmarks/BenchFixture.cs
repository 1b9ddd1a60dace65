using System.Runtime.InteropServices;
using Microsoft.Win32.SafeHandles;
using QcowTier.Storage;

namespace QcowTier.Benchmarks;

/// <summary>
/// The images every benchmark works on, built once per process in a temp dir:
/// a raw file of <see cref="SizeBytes"/> random bytes and a qcow2 image (64 KiB clusters, fully
/// allocated) holding the same guest bytes. Both are filled cluster by cluster in one shuffled
/// guest order, so guest-contiguous clusters are scattered on the qcow2 host file as in a real VM
/// disk, and both files have the same write history (see <see cref="WriteBoth"/>). Both files are
/// written through the page cache and stay there (the machine has far more RAM than they need),
/// so page-cache benchmarks compare CPU and syscall cost, not the disk.
/// </summary>
/// <remarks>
/// Environment: QCOWTIER_BENCH_SIZE_MB (default 256) and QCOWTIER_BENCH_DIR (default the system temp dir).
/// With the in-process toolchain (the default, see Program) one fixture serves every benchmark;
/// out of process, each benchmark process builds its own. The directory is deleted at process exit.
/// </remarks>
internal sealed class BenchFixture
{
    public const int ClusterSize = 65536;
    private const int Seed = 20240601;

    private static readonly Lock Gate = new();
    private static BenchFixture? _shared;

    private BenchFixture(string dir, long size)
    {
        Dir = dir;
        SizeBytes = size;
        RawPath = Path.Combine(dir, "disk.raw");
        QcowPath = Path.Combine(dir, "disk.qcow2");
    }

    public string Dir { get; }

    public long SizeBytes { get; }

    public string RawPath { get; }

    public string QcowPath { get; }

    public static long ConfiguredSize
    {
        get
        {
            var s = Environment.GetEnvironmentVariable("QCOWTIER_BENCH_SIZE_MB");
            var mb = string.IsNullOrEmpty(s) ? 256 : long.Parse(s, System.Globalization.CultureInfo.InvariantCulture);
            if (mb < 16)
            {
                throw new InvalidOperationException("QCOWTIER_BENCH_SIZE_MB must be at least 16");
            }
            return mb << 20;
        }
    }

    /// <summary>The process-wide fixture; built on first use.</summary>
    public static BenchFixture Shared
    {
        get
        {
            lock (Gate)
            {
                return _shared ??= Build(ConfiguredSize);
            }
        }
    }

    /// <summary>A fresh empty directory under the fixture's parent, deleted at process exit.</summary>
    public static string NewTempDir(string tag)
    {
        var root = Environment.GetEnvironmentVariable("QCOWTIER_BENCH_DIR");
        if (string.IsNullOrEmpty(root))
        {
            root = Path.GetTempPath();
        }
        var dir = Path.Combine(root, $"qcowtier-bench-{Environment.ProcessId}-{tag}-{Guid.NewGuid():N}");
        Directory.CreateDirectory(dir);
        AppDomain.CurrentDomain.ProcessExit += (_, _) => TryDelete(dir);
        return dir;
    }

    public static void TryDelete(string dir)
    {
        try
        {
            if (Directory.Exists(dir))
            {
                Directory.Delete(dir, recursive: true);
            }
        }
        catch (IOException)
        {
            // Best effort: a leftover temp dir is not worth failing a benchmark run for.
        }
        catch (UnauthorizedAccessException)
        {
        }
    }

    private static BenchFixture Build(long size)
    {
        var f = new BenchFixture(NewTempDir("images"), size);
        var sw = System.Diagnostics.Stopwatch.StartNew();
        f.WriteBoth();
        f.Verify();
        Console.WriteLine($"// QcowTier fixture: {size >> 20} MiB raw + qcow2 in {f.Dir}, built in {sw.Elapsed.TotalSeconds:F1} s");
        return f;
    }

    /// <summary>
    /// Writes both files with the same history: one 64 KiB write per cluster, in the same shuffled
    /// guest order. That matters: the kernel caches a file in folios sized after the writes that
    /// filled it, and preads from a file written in 1 MiB writes run ~15-20% faster than from one
    /// written in 64 KiB writes (measured on this machine), which would be charged to the engine.
    /// </summary>
    private void WriteBoth()
    {
        var clusters = (int)(SizeBytes / ClusterSize);
        var order = Enumerable.Range(0, clusters).ToArray();
        new Random(Seed + 1).Shuffle(order);
        var buf = new byte[ClusterSize];
        var rng = new Random(Seed);
        using var raw = File.OpenHandle(RawPath, FileMode.CreateNew, FileAccess.ReadWrite, FileShare.ReadWrite);
        RandomAccess.SetLength(raw, SizeBytes);
        using var img = QcowImage.Create(QcowPath, SizeBytes, new QcowCreateOptions { ClusterSize = ClusterSize });
        foreach (var c in order)
        {
            var off = (long)c * ClusterSize;
            rng.NextBytes(buf);
            RandomAccess.Write(raw, buf, off);
            img.Write(off, buf);
        }
        img.Flush();
        // Clean pages on both: an O_DIRECT read of a dirty range would first wait for its writeback.
        RandomAccess.FlushToDisk(raw);
    }

    /// <summary>Spot-checks that both files hold the same guest bytes, so a broken engine cannot post fast numbers.</summary>
    private void Verify()
    {
        using var raw = File.OpenHandle(RawPath, FileMode.Open, FileAccess.Read, FileShare.ReadWrite);
        using var img = QcowImage.Open(QcowPath, new QcowOpenOptions { ReadOnly = true });
        var a = new byte[4096];
        var b = new byte[4096];
        foreach (var off in RandomOffsets(SizeBytes, 4096, 256, Seed + 2))
        {
            RandomAccess.Read(raw, a, off);
            img.Read(off, b);
            if (!a.AsSpan().SequenceEqual(b))
            {
                throw new InvalidOperationException($"fixture check failed: qcow2 and raw differ at guest offset {off}");
            }
        }
    }

    /// <summary>
    /// Host offset of every guest cluster of <paramref name="qcowPath"/> (from the image's map), for the
    /// HostPread rows: the same syscalls the engine ends up making, on the same file, without the engine.
    /// </summary>
    public static long[] HostMap(string qcowPath)
    {
        using var img = QcowImage.Open(qcowPath, new QcowOpenOptions { ReadOnly = true });
        var map = new long[img.Size / ClusterSize];
        Array.Fill(map, -1L);
        foreach (var e in img.GetMap())
        {
            if (e.Kind != QcowExtentKind.Data || e.HostOffset is not { } host)
            {
                continue;
            }
            for (long g = e.Start; g < e.Start + e.Length; g += ClusterSize)
            {
                map[g / ClusterSize] = host + (g - e.Start);
            }
        }
        if (Array.IndexOf(map, -1L) >= 0)
        {
            throw new InvalidOperationException($"{qcowPath}: not every cluster is allocated");
        }
        return map;
    }

    /// <summary>Copies both images into a new directory, for benchmarks that modify them.</summary>
    public (string Raw, string Qcow, string Dir) CopyForWriting(string tag)
    {
        var dir = NewTempDir(tag);
        var raw = Path.Combine(dir, "disk.raw");
        var qcow = Path.Combine(dir, "disk.qcow2");
        File.Copy(RawPath, raw);
        File.Copy(QcowPath, qcow);
        // Start both clean, so neither side's first writes wait on the writeback of the copy.
        foreach (var p in new[] { raw, qcow })
        {
            using var h = File.OpenHandle(p, FileMode.Open, FileAccess.ReadWrite, FileShare.ReadWrite);
            RandomAccess.FlushToDisk(h);
        }
        return (raw, qcow, dir);
    }

    /// <summary>A deterministic sequence of <paramref name="count"/> offsets aligned to <paramref name="block"/> within [0, size).</summary>
    public static long[] RandomOffsets(long size, int block, int count, int seed)
    {
        var rng = new Random(seed);
        var blocks = size / block;
        var result = new long[count];
        for (var i = 0; i < count; i++)
        {
            result[i] = rng.NextInt64(blocks) * block;
        }
        return result;
    }

    public static byte[] RandomBytes(int length, int seed)
    {
        var b = GC.AllocateUninitializedArray<byte>(length, pinned: true);
        new Random(seed).NextBytes(b);
        return b;
    }

    public static SafeFileHandle OpenRaw(string path, bool writable)
        => File.OpenHandle(path, FileMode.Open, writable ? FileAccess.ReadWrite : FileAccess.Read, FileShare.ReadWrite);

    /// <summary>Opens a raw file with O_DIRECT, the same way the engine's cache=none storage does.</summary>
    public static SafeFileHandle OpenRawDirect(string path, bool writable) => NativeMethods.OpenDirect(path, writable);
}

/// <summary>Native memory aligned to 4 KiB, as O_DIRECT needs; the benchmarks hold it for their lifetime.</summary>
internal sealed unsafe class AlignedBuffer : IDisposable
{
    private void* _ptr;

    public AlignedBuffer(int length)
    {
        Length = length;
        _ptr = NativeMemory.AlignedAlloc((nuint)length, 4096);
        NativeMemory.Clear(_ptr, (nuint)length);
    }

    public int Length { get; }

    public Span<byte> Span => new(_ptr, Length);

    public void Dispose()
    {
        if (_ptr != null)
        {
            NativeMemory.AlignedFree(_ptr);
            _ptr = null;
        }
    }
}
