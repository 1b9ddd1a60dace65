using QcowTier.Check;
using QcowTier.Format;
using QcowTier.Storage;
using QcowTier.Tests.Infrastructure;

namespace QcowTier.Tests.Check;

/// <summary>
/// Tiered images (docs/FORMAT.md §2): clusters in the primary file or the HDD data file, the HDD
/// refcounts hosted in the primary. qemu-img cannot read them, so the reference is the content:
/// after a repair the image checks clean, reads as before, and once detached qemu-img finds it
/// clean and equal to the original.
/// </summary>
public sealed class CheckTieredTests
{
    private const long Size = 16L << 20;
    private const int ClusterSize = 65536;

    /// <summary>A tiered image with data on both tiers, and a raw copy of its guest content.</summary>
    private static (string Image, string Raw) Build(TempDir dir)
    {
        var path = dir.File("tiered.qcow2");
        var raw = dir.File("content.raw");
        var rng = new Random(11);
        var content = new byte[Size];
        using (var img = QcowImage.Create(path, Size, new QcowCreateOptions { ClusterSize = ClusterSize, Tier = new QcowTierOptions { DataFile = "tiered.hdd" } }))
        {
            foreach (var (offset, length) in new[] { (0L, 1L << 20), (3L << 20, 512L << 10), (9L << 20, 64L << 10), (12L << 20, 2L << 20) })
            {
                rng.NextBytes(content.AsSpan((int)offset, (int)length));
                img.Write(offset, content.AsSpan((int)offset, (int)length));
            }
            img.MoveToTier(512L << 10, 3L << 20, StorageTier.Hdd);
            img.MoveToTier(12L << 20, 1L << 20, StorageTier.Hdd);
            img.PinTier(14L << 20, 1L << 20, StorageTier.Hdd);
            img.Flush();
            var usage = img.GetTierUsage();
            usage.SsdBytes.Should().BeGreaterThan(0);
            usage.HddBytes.Should().BeGreaterThan(0);
        }
        File.WriteAllBytes(raw, content);
        return (path, raw);
    }

    public static TheoryData<string> Damages() =>
    [
        "hdd-refcount-raised",
        "hdd-refcount-zeroed",
        "hdd-reftable-entry-zeroed",
        "hdd-refblock-misaligned",
        "hdd-copied-cleared",
        "primary-refcount-of-hdd-refblock-zeroed",
        "primary-reftable-entry-zeroed",
    ];

    [Fact]
    public void Clean_tiered_image_checks_clean()
    {
        using var dir = new TempDir();
        var (path, _) = Build(dir);

        using var img = QcowImage.Open(path, new QcowOpenOptions { ReadOnly = true });
        var result = img.Check();

        result.IsClean.Should().BeTrue(CheckHarness.Describe(result));
        result.AllocatedClusters.Should().Be(((1L << 20) + (512L << 10) + (64L << 10) + (2L << 20)) / ClusterSize);
    }

    [Theory]
    [MemberData(nameof(Damages))]
    public void Damaged_tiered_image_is_found_and_repaired(string damage)
    {
        using var dir = new TempDir();
        var (path, raw) = Build(dir);
        var tier = new TieredImage(path);
        Apply(tier, damage);

        CheckReadOnly(path).IsClean.Should().BeFalse($"the damage {damage} must be visible");

        using (var img = QcowImage.Open(path))
        {
            var repaired = img.Check(QcowRepairMode.All);
            repaired.IsClean.Should().BeTrue(CheckHarness.Describe(repaired));
            (repaired.CorruptionsFixed + repaired.LeaksFixed).Should().BeGreaterThan(0);
        }
        var again = CheckReadOnly(path);
        again.IsClean.Should().BeTrue(CheckHarness.Describe(again));
        AssertContent(path, raw);

        // Detached, the image is plain qcow2 again: qemu-img must agree with all of the above.
        using (var img = QcowImage.Open(path))
        {
            img.DetachTier();
        }
        Qemu.AssertClean(path);
        Qemu.AssertSameContent(raw, path, "raw", "qcow2");
    }

    [Fact]
    public void Leak_repair_on_a_tiered_image_frees_hdd_clusters()
    {
        using var dir = new TempDir();
        var (path, raw) = Build(dir);
        var tier = new TieredImage(path);
        var hddCluster = tier.HddCluster(8);
        tier.SetHddRefcount(hddCluster, 3);

        var found = CheckReadOnly(path);
        found.Leaks.Should().Be(1);
        found.Corruptions.Should().Be(1, "the COPIED flag no longer matches a refcount of 3");
        found.Messages.Should().Contain($"Leaked HDD cluster {hddCluster} refcount=3 reference=1");

        using (var img = QcowImage.Open(path))
        {
            var repaired = img.Check(QcowRepairMode.Leaks);
            repaired.LeaksFixed.Should().Be(1);
            repaired.IsClean.Should().BeTrue(CheckHarness.Describe(repaired));
        }
        tier.HddRefcount(hddCluster).Should().Be(1);
        AssertContent(path, raw);
    }

    [Fact]
    public void Interrupted_attach_leaves_a_plain_image_whose_tier_structures_are_leaks_for_both_tools()
    {
        using var dir = new TempDir();
        var path = dir.File("plain.qcow2");
        using (var img = QcowImage.Create(path, Size, new QcowCreateOptions { ClusterSize = ClusterSize }))
        {
            img.Write(0, new byte[1 << 20]);
            img.AttachTier(new QcowTierOptions { DataFile = "plain.hdd" });
        }
        // Cut before the last step of an attach: incompatible bit 63 never reached the disk.
        var image = new RawImage(path);
        image.WriteU64(QcowHeader.OffsetIncompatibleFeatures, image.ReadU64(QcowHeader.OffsetIncompatibleFeatures) & ~TierExtension.IncompatMask);

        var qemu = CheckHarness.Qemu(path);
        qemu.Leaks.Should().BeGreaterThan(0, qemu.ToString());
        CheckHarness.Ours(path).ShouldMatchFigures(qemu);

        CheckHarness.Ours(path, QcowRepairMode.Leaks).IsClean.Should().BeTrue();
        Qemu.AssertClean(path);
    }

    [Fact]
    public void Power_cut_during_a_tiered_rebuild_leaves_at_worst_leaks()
    {
        using var dir = new TempDir();
        var (path, raw) = Build(dir);
        var tier = new TieredImage(path);
        Apply(tier, "hdd-reftable-entry-zeroed");
        var original = File.ReadAllBytes(path);
        var hddPath = dir.File("tiered.hdd");

        int writes;
        using (var hdd = FileStorage.Open(hddPath, writable: false))
        {
            var dry = new CrashingStorage(original);
            QcowChecker.Run(dry, TieredImage.Header(original), QcowRepairMode.All, hdd).IsClean.Should().BeTrue();
            writes = dry.Writes;
        }
        writes.Should().BeGreaterThan(2);

        for (var cut = 0; cut < writes; cut++)
        {
            var storage = new CrashingStorage(original) { CutAt = cut };
            using (var hdd = FileStorage.Open(hddPath, writable: false))
            {
                var act = () => QcowChecker.Run(storage, TieredImage.Header(original), QcowRepairMode.All, hdd);
                act.Should().Throw<OperationCanceledException>();
            }
            File.WriteAllBytes(path, storage.Durable);
            var seen = CheckReadOnly(path);
            var because = $"power cut at write {cut} of {writes}:\n{CheckHarness.Describe(seen)}";
            // Whatever survived: the HDD refcounts are either the old (damaged) ones or complete new ones.
            seen.Messages.Where(m => m.StartsWith("ERROR cluster", StringComparison.Ordinal)).Should().BeEmpty(because);
            AssertContent(path, raw);
            using (var img = QcowImage.Open(path))
            {
                img.Check(QcowRepairMode.All).IsClean.Should().BeTrue(because);
            }
            CheckReadOnly(path).IsClean.Should().BeTrue(because);
            AssertContent(path, raw);
        }
    }

    private static void Apply(TieredImage tier, string damage)
    {
        var hddCluster = tier.HddCluster(8);
        switch (damage)
        {
            case "hdd-refcount-raised":
                tier.SetHddRefcount(hddCluster, 2);
                break;
            case "hdd-refcount-zeroed":
                tier.SetHddRefcount(hddCluster, 0);
                break;
            case "hdd-reftable-entry-zeroed":
                tier.Raw.WriteU64(tier.HddRefcountTableOffset, 0);
                break;
            case "hdd-refblock-misaligned":
                tier.Raw.WriteU64(tier.HddRefcountTableOffset, tier.Raw.ReadU64(tier.HddRefcountTableOffset) + 0x200);
                break;
            case "hdd-copied-cleared":
                tier.Raw.WriteU64(tier.Raw.L2EntryOffset(8), tier.Raw.L2Entry(8) & ~ClusterLayout.Copied);
                break;
            case "primary-refcount-of-hdd-refblock-zeroed":
                tier.Raw.SetRefcount((long)(tier.Raw.ReadU64(tier.HddRefcountTableOffset) >> tier.Raw.ClusterBits), 0);
                break;
            default:
                tier.Raw.WriteU64(tier.Raw.RefcountTableEntryOffset(0), 0);
                break;
        }
    }

    private static QcowCheckResult CheckReadOnly(string path)
    {
        using var img = QcowImage.Open(path, new QcowOpenOptions { ReadOnly = true });
        return img.Check();
    }

    private static void AssertContent(string path, string raw)
    {
        var expected = File.ReadAllBytes(raw);
        var actual = new byte[Size];
        using (var img = QcowImage.Open(path, new QcowOpenOptions { ReadOnly = true }))
        {
            img.Read(0, actual);
        }
        actual.AsSpan().SequenceEqual(expected).Should().BeTrue("the guest content must not change");
    }

    /// <summary>The primary file of a tiered image, with the HDD refcounts located through the TIER extension.</summary>
    private sealed class TieredImage
    {
        public TieredImage(string path)
        {
            Raw = new RawImage(path);
            var header = Header(File.ReadAllBytes(path));
            var ext = header.Extensions.Single(e => e.Type == TierExtension.Type);
            HddRefcountTableOffset = TierExtension.Parse(ext.Data, ext.Offset, path).HddRefcountTableOffset;
        }

        public RawImage Raw { get; }

        public long HddRefcountTableOffset { get; }

        public static QcowHeader Header(byte[] image)
            => QcowHeader.Parse(image.AsSpan(0, Math.Min(image.Length, 1 << QcowHeader.MaxClusterBits)), image.Length, "tiered");

        /// <summary>The HDD cluster of a guest cluster that lives on the HDD tier.</summary>
        public long HddCluster(long guestCluster)
        {
            var entry = Raw.L2Entry(guestCluster);
            (entry & TierExtension.L2HddBit).Should().NotBe(0UL, $"guest cluster {guestCluster} is on the HDD tier");
            return (long)(entry & ClusterLayout.L2OffsetMask) >> Raw.ClusterBits;
        }

        public ulong HddRefcount(long cluster)
        {
            var (block, index) = Locate(cluster);
            var data = new byte[Raw.ClusterSize];
            ReadAt(block, data);
            return RefcountBlock.Get(data, index, Raw.RefcountOrder);
        }

        public void SetHddRefcount(long cluster, ulong value)
        {
            var (block, index) = Locate(cluster);
            var data = new byte[Raw.ClusterSize];
            ReadAt(block, data);
            RefcountBlock.Set(data, index, Raw.RefcountOrder, value);
            Raw.WriteBytes(block, data);
        }

        private (long Block, int Index) Locate(long cluster)
        {
            var blockBits = Raw.ClusterBits + 3 - Raw.RefcountOrder;
            var block = (long)(Raw.ReadU64(HddRefcountTableOffset + (cluster >> blockBits) * 8) & OnDiskRefcounts.OffsetMask);
            return (block, (int)(cluster & ((1L << blockBits) - 1)));
        }

        private void ReadAt(long offset, byte[] data)
        {
            for (var i = 0; i < data.Length; i += 8)
            {
                System.Buffers.Binary.BinaryPrimitives.WriteUInt64BigEndian(data.AsSpan(i), Raw.ReadU64(offset + i));
            }
        }
    }

    /// <summary>In-memory primary file whose unflushed writes are lost at the cut (the harshest survivor set).</summary>
    private sealed class CrashingStorage : ImageStorage
    {
        private byte[] _current;

        public CrashingStorage(byte[] image)
        {
            Durable = (byte[])image.Clone();
            _current = (byte[])image.Clone();
        }

        public byte[] Durable { get; private set; }

        public int CutAt { get; init; } = -1;

        public int Writes { get; private set; }

        public override string? Name => "tiered.qcow2";

        public override long Length => _current.Length;

        public override bool CanWrite => true;

        public override void Read(long offset, Span<byte> buffer)
        {
            buffer.Clear();
            if (offset < _current.Length)
            {
                _current.AsSpan((int)offset, (int)Math.Min(buffer.Length, _current.Length - offset)).CopyTo(buffer);
            }
        }

        public override void Write(long offset, ReadOnlySpan<byte> data)
        {
            if (Writes++ == CutAt)
            {
                throw new OperationCanceledException("power cut");
            }
            if (offset + data.Length > _current.Length)
            {
                Array.Resize(ref _current, (int)(offset + data.Length));
            }
            data.CopyTo(_current.AsSpan((int)offset));
        }

        public override void SetLength(long length)
        {
            if (Writes++ == CutAt)
            {
                throw new OperationCanceledException("power cut");
            }
            Array.Resize(ref _current, (int)length);
        }

        public override void Flush() => Durable = (byte[])_current.Clone();
    }
}
