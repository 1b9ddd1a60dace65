using QcowTier.Tests.Crash;
using QcowTier.Tests.Infrastructure;
using QcowTier.Tests.Interop.Support;
using static QcowTier.Tests.Compression.CompressionKit;

namespace QcowTier.Tests.Compression;

/// <summary>Power cuts in the middle of compressed writes, copy-on-write and frees: at worst leaks, and every cluster readable.</summary>
public sealed class CompressedCrashTests
{
    private const int Cs = 4096;
    private const long Size = 32L * Cs;

    private static readonly QcowOpenOptions SmallCaches = new() { L2CacheSize = 2 * Cs, RefcountCacheSize = 2 * Cs };

    private static (QcowImage Image, FaultInjectingStorage Storage, byte[] Content) Setup()
    {
        var storage = new FaultInjectingStorage(name: "crash.qcow2");
        var content = MixedContent(Size, Cs, 77);
        using (var img = QcowImage.CreateOn(storage, Size, new QcowCreateOptions { ClusterSize = Cs, CompressionType = QcowCompressionType.Zstd }))
        {
            img.WriteCompressed(0, content);
        }
        return (QcowImage.OpenOn(storage, SmallCaches), storage, content);
    }

    /// <summary>Everything here touches clusters 8-23 only.</summary>
    private static void Ops(QcowImage img, byte[] content)
    {
        img.Write(8L * Cs + 100, new byte[300]);                 // copy-on-write of a compressed cluster
        img.Discard(10L * Cs, 2L * Cs);
        img.WriteCompressed(10L * Cs, content.AsSpan(0, 4 * Cs)); // into freed and compressed clusters
        img.Flush();
        img.WriteZeroes(14L * Cs, Cs);
        img.WriteCompressed(16L * Cs, content.AsSpan(0, 8 * Cs));
        img.Write(20L * Cs + Cs - 1, new byte[] { 1, 2 });
        img.Flush();
    }

    [Theory]
    [InlineData(false)]
    [InlineData(true)]
    public void CutsLeaveAtWorstLeaks(bool randomSubset)
    {
        using var dir = new TempDir();
        long total;
        {
            var (img, storage, content) = Setup();
            var start = storage.WriteCount;
            Ops(img, content);
            img.Dispose();
            total = storage.WriteCount - start;
        }
        total.Should().BeGreaterThan(10);
        for (var cut = 1L; cut <= total; cut += Math.Max(1, total / 24))
        {
            var (img, storage, content) = Setup();
            storage.CutAtWrite(storage.WriteCount + cut);
            try
            {
                Ops(img, content);
                img.Dispose();
            }
            catch (Exception e) when (storage.IsCut)
            {
                _ = e;
            }
            var bytes = randomSubset ? storage.CrashImage(new Random((int)cut), 0.5, tear: true) : storage.DurableImage();
            var path = dir.File($"cut-{cut}.qcow2");
            File.WriteAllBytes(path, bytes);
            QemuTools.AssertNoCorruption(path);
            var raw = QemuTools.ReadRaw(path, dir); // every cluster decompresses
            QemuTools.AssertBytesEqual(content.AsSpan(0, 8 * Cs), raw.AsSpan(0, 8 * Cs), $"untouched clusters after a cut at write {cut}");
            QemuTools.AssertBytesEqual(content.AsSpan(24 * Cs), raw.AsSpan(24 * Cs), $"untouched clusters after a cut at write {cut}");
        }
    }
}
