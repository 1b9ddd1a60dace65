using BenchmarkDotNet.Attributes;

namespace QcowTier.Benchmarks;

/// <summary>
/// Reads of compressed clusters (page cache): whole 64 KiB clusters in guest order, where each read
/// is one decompression, and random 4 KiB reads, each of which decompresses a whole cluster to serve
/// 4 KiB (as QEMU does). Baseline: the same bytes in an uncompressed image. The content is text-like
/// (about 3:1 with deflate). Expect decompression, not I/O, to dominate.
/// </summary>
[MemoryDiagnoser]
[BenchmarkCategory("CompressedRead")]
[BytesPerOperation(Cluster)]
public class CompressedRead
{
    private const int Cluster = 65536;
    private const int Ops = 32;
    private string _dir = null!;
    private QcowImage _plain = null!;
    private QcowImage _compressed = null!;
    private byte[] _buf = null!;
    private long[] _offsets = null!;
    private long _size;
    private long _next;
    private int _nextRandom;

    [Params(QcowCompressionType.Zlib, QcowCompressionType.Zstd)]
    public QcowCompressionType Type { get; set; }

    [GlobalSetup]
    public void Setup()
    {
        _dir = BenchFixture.NewTempDir("compressed");
        _size = Math.Min(BenchFixture.ConfiguredSize, 64L << 20) / Cluster * Cluster;
        var words = new[] { "cluster ", "qcow2 ", "refcount ", "table ", "guest ", "host ", "offset ", "zstd ", "deflate ", "tier " };
        var rng = new Random(5);
        var chunk = new byte[1 << 20];
        var plainPath = Path.Combine(_dir, "plain.qcow2");
        var compressedPath = Path.Combine(_dir, "compressed.qcow2");
        using (var plain = QcowImage.Create(plainPath, _size))
        using (var compressed = QcowImage.Create(compressedPath, _size, new QcowCreateOptions { CompressionType = Type }))
        {
            for (long pos = 0; pos < _size; pos += chunk.Length)
            {
                var n = (int)Math.Min(chunk.Length, _size - pos);
                for (var i = 0; i < n;)
                {
                    var w = words[rng.Next(words.Length)];
                    for (var k = 0; k < w.Length && i < n; k++)
                    {
                        chunk[i++] = (byte)w[k];
                    }
                    if (rng.Next(8) == 0 && i < n)
                    {
                        chunk[i++] = (byte)rng.Next(256);
                    }
                }
                plain.Write(pos, chunk.AsSpan(0, n));
                compressed.WriteCompressed(pos, chunk.AsSpan(0, n));
            }
        }
        _plain = QcowImage.Open(plainPath, new QcowOpenOptions { ReadOnly = true });
        _compressed = QcowImage.Open(compressedPath, new QcowOpenOptions { ReadOnly = true });
        _buf = GC.AllocateUninitializedArray<byte>(Cluster, pinned: true);
        _offsets = BenchFixture.RandomOffsets(_size, 4096, 1 << 12, 17);
    }

    [GlobalCleanup]
    public void Cleanup()
    {
        _plain.Dispose();
        _compressed.Dispose();
        BenchFixture.TryDelete(_dir);
    }

    private int Sequential(QcowImage image)
    {
        var pos = _next;
        for (var k = 0; k < Ops; k++)
        {
            image.Read(pos, _buf);
            pos += Cluster;
            if (pos >= _size)
            {
                pos = 0;
            }
        }
        _next = pos;
        return _buf[0];
    }

    [Benchmark(Baseline = true, OperationsPerInvoke = Ops)]
    public int Uncompressed64K() => Sequential(_plain);

    [Benchmark(OperationsPerInvoke = Ops)]
    public int Compressed64K() => Sequential(_compressed);

    /// <summary>Random 4 KiB reads of the compressed image (reported bytes are per 64 KiB: divide by 16 for 4 KiB throughput).</summary>
    [Benchmark(OperationsPerInvoke = Ops)]
    public int CompressedRandom4K()
    {
        var i = _nextRandom;
        for (var k = 0; k < Ops; k++)
        {
            _compressed.Read(_offsets[i], _buf.AsSpan(0, 4096));
            i = (i + 1) & (_offsets.Length - 1);
        }
        _nextRandom = i;
        return _buf[0];
    }
}
