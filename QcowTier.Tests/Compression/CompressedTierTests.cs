using QcowTier.Tests.Infrastructure;
using QcowTier.Tests.Interop.Support;
using QcowTier.Tests.Tiering.Support;
using static QcowTier.Tests.Compression.CompressionKit;

namespace QcowTier.Tests.Compression;

/// <summary>Compressed clusters in tiered images: stored on either tier (bit 63 of the entry selects HDD), moved both ways, detached for QEMU.</summary>
public sealed class CompressedTierTests
{
    private const int Cs = 65536;

    /// <summary>Our checker counts both files' references, compressed ones included (TierKit's model knows whole clusters only).</summary>
    private static void AssertClean(QcowImage img)
    {
        var check = img.Check();
        check.Corruptions.Should().Be(0);
        check.Leaks.Should().Be(0);
        check.CompressedClusters.Should().BeGreaterThan(0);
    }

    [Theory]
    [InlineData(StorageTier.Hdd, QcowCompressionType.Zlib)]
    [InlineData(StorageTier.Ssd, QcowCompressionType.Zstd)]
    public void CompressedClustersLiveOnEitherTierAndMove(StorageTier defaultTier, QcowCompressionType type)
    {
        using var dir = new TempDir();
        var path = dir.File("tiered.qcow2");
        var model = new DiskModel(64L * Cs, Cs);
        var content = MixedContent(model.Size, Cs, 4);
        var options = TierKit.Tiered(Cs, defaultTier: defaultTier);
        options = new QcowCreateOptions { ClusterSize = Cs, Tier = options.Tier, CompressionType = type };
        using (var img = QcowImage.Create(path, model.Size, options))
        {
            img.WriteCompressed(0, content.AsSpan(0, 32 * Cs));
            img.Write(32L * Cs, content.AsSpan(32 * Cs, 32 * Cs));
            model.Write(0, content);
            img.GetMap(0, 32L * Cs).Should().Contain(e => e.Kind == QcowExtentKind.Compressed && e.Tier == defaultTier);
            TierKit.AssertContent(img, model, "after compressed writes");
            AssertClean(img);

            // Move everything to the other tier and back again, with a partial overwrite in between.
            var other = defaultTier == StorageTier.Hdd ? StorageTier.Ssd : StorageTier.Hdd;
            img.MoveToTier(0, img.Size, other);
            img.GetMap(0, 32L * Cs).Where(e => e.Kind == QcowExtentKind.Compressed).Should().OnlyContain(e => e.Tier == other);
            TierKit.AssertContent(img, model, "after moving to " + other);
            AssertClean(img);
            img.Write(3L * Cs + 17, new byte[] { 1, 2, 3 });
            model.Write(3L * Cs + 17, new byte[] { 1, 2, 3 });
            img.Discard(6L * Cs, 2L * Cs);
            model.Discard(6L * Cs, 2L * Cs);
            img.MoveToTier(0, 16L * Cs, defaultTier);
            TierKit.AssertContent(img, model, "after moving part back");
            AssertClean(img);
            var check = img.Check();
            check.Corruptions.Should().Be(0);
            check.Leaks.Should().Be(0);
        }
        using (var img = QcowImage.Open(path))
        {
            TierKit.AssertContent(img, model, "reopened");
        }
        TierKit.DetachAndJudgeWithQemu(path, model, dir);
        QemuCompressedClusters(path).Should().BeGreaterThan(0, "clusters stay compressed through moves and detach");
    }

    [Fact]
    public void QemuCompressedImageAttachedAndDemoted()
    {
        using var dir = new TempDir();
        var content = MixedContent(40L * Cs, Cs, 12);
        var path = QemuCompressed(dir, content, Cs, "zlib");
        var model = new DiskModel(content.Length, Cs);
        model.Write(0, content);
        using (var img = QcowImage.Open(path))
        {
            img.AttachTier(new QcowTierOptions { DataFile = "attached.hdd", DefaultTier = StorageTier.Hdd });
            img.MoveToTier(0, img.Size, StorageTier.Hdd);
            img.GetPlacement().Where(e => e.Tier is not null).Should().OnlyContain(e => e.Tier == StorageTier.Hdd);
            img.WriteCompressed(0, content.AsSpan(0, 4 * Cs));
            TierKit.AssertContent(img, model);
            AssertClean(img);
        }
        TierKit.DetachAndJudgeWithQemu(path, model, dir);
    }
}
