using QcowTier.Tests.Infrastructure;
using QcowTier.Tests.Interop.Support;

namespace QcowTier.Tests.Compression;

/// <summary>Guest content that exercises every compression path, and helpers to judge images with QEMU.</summary>
internal static class CompressionKit
{
    /// <summary>
    /// Per cluster, cycling: compressible text, incompressible random bytes (stored uncompressed),
    /// zeroes, a pattern whose repeats are 10,000 bytes apart (deflate back-references beyond QEMU's
    /// 4 KiB window) and a cluster that compresses to almost nothing.
    /// </summary>
    public static byte[] MixedContent(long size, int clusterSize, int seed)
    {
        var rng = new Random(seed);
        var data = new byte[size];
        var clusters = (int)((size + clusterSize - 1) / clusterSize);
        for (var c = 0; c < clusters; c++)
        {
            var start = c * clusterSize;
            var span = data.AsSpan(start, (int)Math.Min(clusterSize, size - start));
            switch (c % 6)
            {
                case 0:
                case 5:
                    for (var i = 0; i < span.Length; i++)
                    {
                        span[i] = (byte)"the quick brown fox jumps over the lazy dog "[(i + c * 7 + rng.Next(0, 2)) % 44];
                    }
                    break;
                case 1:
                    rng.NextBytes(span);
                    break;
                case 2:
                    break;
                case 3:
                    var block = new byte[10_000];
                    rng.NextBytes(block);
                    for (var i = 0; i < span.Length; i++)
                    {
                        span[i] = block[i % block.Length];
                    }
                    break;
                case 4:
                    span.Fill((byte)(c + 1));
                    break;
            }
        }
        return data;
    }

    /// <summary>qemu-img convert -c of raw content into a new qcow2 image.</summary>
    public static string QemuCompressed(TempDir dir, byte[] content, int clusterSize, string compressionType, string name = "qemu-c.qcow2", string extra = "")
    {
        var raw = dir.File(name + ".raw");
        File.WriteAllBytes(raw, content);
        var path = dir.File(name);
        var options = $"cluster_size={clusterSize},compression_type={compressionType}" + extra;
        QemuTools.Img("convert", "-q", "-c", "-f", "raw", "-O", "qcow2", "-o", options, raw, path).EnsureSuccess();
        return path;
    }

    public static string WriteRaw(TempDir dir, byte[] content, string name = "expected.raw")
    {
        var path = dir.File(name);
        File.WriteAllBytes(path, content);
        return path;
    }

    /// <summary>qemu-img check's compressed cluster count (from its fragmentation line).</summary>
    public static long QemuCompressedClusters(string path)
    {
        var r = QemuTools.Img("check", "--output=json", "-f", "qcow2", path);
        using var doc = System.Text.Json.JsonDocument.Parse(r.StdOut);
        return doc.RootElement.TryGetProperty("compressed-clusters", out var v) ? v.GetInt64() : 0;
    }

    public static QcowCompressionType TypeOf(string name) => name == "zstd" ? QcowCompressionType.Zstd : QcowCompressionType.Zlib;
}
