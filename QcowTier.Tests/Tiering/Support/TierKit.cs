using System.Buffers.Binary;
using QcowTier.Tests.Infrastructure;

namespace QcowTier.Tests.Tiering.Support;

/// <summary>Shared checks and builders for the tiering tests.</summary>
internal static class TierKit
{
    public const uint TierExtensionType = 0x54494552; // "TIER"

    public static QcowCreateOptions Tiered(int clusterSize, string dataFile = "data.hdd", StorageTier defaultTier = StorageTier.Ssd,
        long ssdBudget = 0, int refcountBits = 16, QcowCacheMode cache = QcowCacheMode.Writeback) => new()
        {
            ClusterSize = clusterSize,
            RefcountBits = refcountBits,
            CacheMode = cache,
            Tier = new QcowTierOptions { DataFile = dataFile, DefaultTier = defaultTier, SsdBudget = ssdBudget },
        };

    /// <summary>Reads the whole disk through the image and compares it with the model, naming the first differing byte.</summary>
    public static void AssertContent(QcowImage image, DiskModel model, string because = "")
    {
        image.Size.Should().Be(model.Size, because);
        var chunk = new byte[Math.Min(model.Size, 1 << 20)];
        for (long pos = 0; pos < model.Size; pos += chunk.Length)
        {
            var n = (int)Math.Min(chunk.Length, model.Size - pos);
            image.Read(pos, chunk.AsSpan(0, n));
            AssertSame(chunk.AsSpan(0, n), model.Data.AsSpan((int)pos, n), pos, because);
        }
    }

    public static void AssertSame(ReadOnlySpan<byte> actual, ReadOnlySpan<byte> expected, long guestOffset, string because)
    {
        if (actual.SequenceEqual(expected))
        {
            return;
        }
        var i = 0;
        while (actual[i] == expected[i])
        {
            i++;
        }
        throw new Xunit.Sdk.XunitException(
            $"guest byte 0x{guestOffset + i:x} reads 0x{actual[i]:x2}, expected 0x{expected[i]:x2} {because}");
    }

    /// <summary>The tier of every cluster, from <see cref="QcowImage.GetPlacement"/> (null: not allocated).</summary>
    public static StorageTier?[] ClusterTiers(QcowImage image)
    {
        var cs = image.ClusterSize;
        var tiers = new StorageTier?[(image.Size + cs - 1) / cs];
        long covered = 0;
        foreach (var e in image.GetPlacement())
        {
            e.Start.Should().Be(covered, "placement extents are in order and cover the disk");
            covered += e.Length;
            for (var c = e.Start / cs; c * cs < e.Start + e.Length; c++)
            {
                tiers[c] = e.Tier;
            }
        }
        covered.Should().Be(image.Size);
        return tiers;
    }

    /// <summary>GetTierUsage agrees with GetPlacement, cluster by cluster.</summary>
    public static TierUsage AssertUsageMatchesPlacement(QcowImage image, string because = "")
    {
        var tiers = ClusterTiers(image);
        var usage = image.GetTierUsage();
        var cs = image.ClusterSize;
        usage.SsdBytes.Should().Be(tiers.LongCount(t => t == StorageTier.Ssd) * cs, "SSD usage must match the placement " + because);
        usage.HddBytes.Should().Be(tiers.LongCount(t => t == StorageTier.Hdd) * cs, "HDD usage must match the placement " + because);
        return usage;
    }

    /// <summary>
    /// A tier-aware refcount check of both files, from the image's own structures: every cluster of the
    /// primary (header, L1, L2 tables, both refcount tables and their blocks, hints table, SSD data) and of
    /// the HDD data file (its header, HDD data) must be counted exactly as often as it is referenced; with
    /// <paramref name="allowLeaks"/>, counted at least as often (a crash may leak, never under-count).
    /// Call on a flushed or freshly opened image.
    /// </summary>
    public static void AssertRefcounts(QcowImage image, bool allowLeaks = false, string because = "")
    {
        var core = image.Core;
        var cs = image.ClusterSize;
        var primary = new Dictionary<long, long>();
        var hddRefs = new Dictionary<long, long> { [0] = 1 }; // the data file header
        void Ref(Dictionary<long, long> d, long offset, long clusters)
        {
            for (var c = offset / cs; c < offset / cs + clusters; c++)
            {
                d[c] = d.GetValueOrDefault(c) + 1;
            }
        }

        var h = core.Header;
        Ref(primary, 0, 1);
        Ref(primary, h.L1TableOffset, (h.L1Size * 8L + cs - 1) / cs);
        foreach (var e in core.L1)
        {
            var l2 = (long)(e & Format.ClusterLayout.L1OffsetMask);
            if (l2 != 0)
            {
                Ref(primary, l2, 1);
            }
        }
        Ref(primary, h.RefcountTableOffset, h.RefcountTableClusters);
        foreach (var block in core.Refcounts.Table.Where(b => b != 0))
        {
            Ref(primary, block, 1);
        }
        var tier = core.Tier;
        if (tier is not null)
        {
            Ref(primary, tier.HddRefcountTableOffset, tier.HddRefcountTableClusters);
            foreach (var block in core.HddRefcounts!.Table.Where(b => b != 0))
            {
                Ref(primary, block, 1);
            }
            if (tier.HintsCount > 0)
            {
                Ref(primary, tier.HintsOffset, (tier.HintsCount * 24L + cs - 1) / cs);
            }
        }
        foreach (var (_, length, kind, host, t) in core.Map(0, image.Size))
        {
            if (kind is Engine.ClusterKind.Normal or Engine.ClusterKind.ZeroAllocated)
            {
                Ref(t == 1 ? hddRefs : primary, host / cs * cs, (host % cs + length + cs - 1) / cs);
            }
        }
        var wrong = new List<string>();
        void Compare(string file, Dictionary<long, long> refs, Engine.RefcountManager counts, long fileLength)
        {
            var clusters = Math.Max((fileLength + cs - 1) / cs, refs.Keys.DefaultIfEmpty(0).Max() + 1) + 64;
            for (long c = 0; c < clusters && wrong.Count < 10; c++)
            {
                var have = (long)counts.Get(c);
                var want = refs.GetValueOrDefault(c);
                if (have < want || (have > want && !allowLeaks))
                {
                    wrong.Add($"{file} cluster {c} (0x{c * cs:x}): refcount {have}, referenced {want} time(s)");
                }
            }
        }
        Compare("primary", primary, core.Refcounts, core.File.Length);
        if (tier is not null)
        {
            Compare("HDD", hddRefs, core.HddRefcounts!, core.HddFile!.Length);
        }
        else
        {
            hddRefs.Should().HaveCount(1, "a plain image references nothing on an HDD file");
        }
        if (wrong.Count > 0)
        {
            throw new Xunit.Sdk.XunitException($"refcounts differ from the references {because}:\n" + string.Join("\n", wrong));
        }
    }

    /// <summary>Detaches (all data back on the primary file), then lets QEMU judge the image and its content.</summary>
    public static void DetachAndJudgeWithQemu(string imagePath, DiskModel model, TempDir dir)
    {
        string hdd;
        using (var img = QcowImage.Open(imagePath))
        {
            img.IsTiered.Should().BeTrue();
            hdd = img.TierDataFile!;
            img.DetachTier();
            img.IsTiered.Should().BeFalse();
            img.GetTierUsage().HddBytes.Should().Be(0);
            AssertContent(img, model, "after DetachTier");
        }
        File.Exists(hdd).Should().BeFalse("DetachTier deletes the HDD data file");
        Qemu.AssertClean(imagePath);
        Qemu.AssertSameContent(model.SaveRaw(dir.File($"model-{Guid.NewGuid():N}.raw")), imagePath, "raw", "qcow2");
    }

    /// <summary>File offset of the TIER extension's data in cluster 0, and its length.</summary>
    public static (int DataOffset, int Length) FindTierExtension(byte[] cluster0)
    {
        var headerLength = (int)BinaryPrimitives.ReadUInt32BigEndian(cluster0.AsSpan(100));
        var pos = headerLength;
        while (pos + 8 <= cluster0.Length)
        {
            var type = BinaryPrimitives.ReadUInt32BigEndian(cluster0.AsSpan(pos));
            var len = (int)BinaryPrimitives.ReadUInt32BigEndian(cluster0.AsSpan(pos + 4));
            if (type == 0)
            {
                break;
            }
            if (type == TierExtensionType)
            {
                return (pos + 8, len);
            }
            pos += 8 + ((len + 7) & ~7);
        }
        throw new Xunit.Sdk.XunitException("no TIER extension in cluster 0");
    }

    public static byte[] RandomBytes(Random rng, int length)
    {
        var b = new byte[length];
        rng.NextBytes(b);
        return b;
    }
}
