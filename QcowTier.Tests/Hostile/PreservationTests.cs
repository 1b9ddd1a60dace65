using QcowTier.Tests.Hostile.Support;
using QcowTier.Tests.Infrastructure;
using QcowTier.Tests.Interop.Support;
using static QcowTier.Tests.Hostile.Support.HostileImage;

namespace QcowTier.Tests.Hostile;

/// <summary>
/// What a writer must leave alone (unknown header fields, unknown extensions, unknown compatible bits),
/// what it must clear (unknown autoclear bits) and what it must repair (a dirty image).
/// </summary>
public sealed class PreservationTests
{
    /// <summary>Writes, discards, zeroes and resizes that grow (and so move) the L1 table: the header fields we own get rewritten.</summary>
    private static void WriteALot(string path)
    {
        using var img = QcowImage.Open(path);
        var rng = new Random(5);
        var data = new byte[200 << 10];
        rng.NextBytes(data);
        img.Write(12345, data);
        img.Resize(600L << 20); // 64 KiB clusters: 2 L1 entries instead of 1, a new L1 table
        img.Resize(70L << 30);  // 140 entries: it moves again
        img.Write((69L << 30) + 7, data);
        img.Discard(0, 1 << 20);
        img.WriteZeroes(2 << 20, 3 << 20, mayUnmap: true);
        img.Flush();
    }

    /// <summary>Every header byte outside the fields the engine maintains, and the whole extension area, stays byte-identical.</summary>
    private static void AssertHeaderPreserved(byte[] before, byte[] after, int clusterSize, string why)
    {
        // Fields we may legitimately rewrite: size (24..32), l1_size and l1_table_offset (36..48),
        // refcount_table_offset and clusters (48..60), incompatible (72..80: dirty bit) and autoclear (88..96) features.
        static bool Owned(int i) => i is >= 24 and < 32 or >= 36 and < 60 or >= 72 and < 80 or >= 88 and < 96;
        for (var i = 0; i < clusterSize; i++)
        {
            if (!Owned(i) && before[i] != after[i])
            {
                throw new Xunit.Sdk.XunitException($"{why}: header cluster byte {i} (0x{i:x}) changed from 0x{before[i]:x2} to 0x{after[i]:x2}");
            }
        }
    }

    [Fact]
    public void UnknownHeaderExtensionsFieldsAndCompatibleBitsSurviveOurWrites()
    {
        using var dir = new TempDir();
        var img = CreateBase(dir);
        // header_length 120: 8 bytes of a future header field, then the extensions (unknown ones included).
        var ext = Enumerable.Range(0, 37).Select(i => (byte)(i * 7 + 1)).ToArray(); // odd length: padded
        img.SetU32(HeaderLength, 120);
        img.SetExtensions(
            (0xdeadbeef, ext),
            (FeatureNameTableType, FeatureNameTable([.. QemuFeatures])),
            (0x0badcafe, [1, 2, 3, 4, 5, 6, 7, 8]));
        img.SetU64(112, 0x0123456789abcdef);
        img.SetU64(CompatibleFeatures, (1UL << 5) | (1UL << 40));
        var path = img.Save();
        QemuTools.Img("info", "-f", "qcow2", path).EnsureSuccess();
        var before = File.ReadAllBytes(path);

        WriteALot(path);

        var after = File.ReadAllBytes(path);
        AssertHeaderPreserved(before, after, img.ClusterSize, "after our writes");
        Load(path).U64(CompatibleFeatures).Should().Be((1UL << 5) | (1UL << 40));
        QemuTools.AssertClean(path);
    }

    [Fact]
    public void UnknownAutoclearBitsAreClearedOnWritableOpenOnly()
    {
        using var dir = new TempDir();
        var img = CreateBase(dir);
        img.SetU64(AutoclearFeatures, (1UL << 63) | (1UL << 9));
        var path = img.Save();
        var before = File.ReadAllBytes(path);

        using (var ro = QcowImage.Open(path, new QcowOpenOptions { ReadOnly = true }))
        {
            ro.Read(0, new byte[4096]);
        }
        File.ReadAllBytes(path).Should().Equal(before, "a read-only open writes nothing");

        // QEMU clears the bits it does not know on a writable open: so do we.
        var qemuCopy = img.Save(dir.File("qemu.qcow2"));
        QemuTools.Io("-f", "qcow2", "-c", "flush", qemuCopy).EnsureSuccess();
        var qemuAutoclear = Load(qemuCopy).U64(AutoclearFeatures);
        QcowImage.Open(path).Dispose();
        Load(path).U64(AutoclearFeatures).Should().Be(qemuAutoclear).And.Be(0UL);
        AssertHeaderPreserved(before, File.ReadAllBytes(path), img.ClusterSize, "after a writable open");
    }

    /// <summary>
    /// A lazy-refcounts image QEMU aborted in the middle of writing: dirty bit set, refcounts stale.
    /// A writable open repairs it (as QEMU does) and clears the bit; the data is intact.
    /// </summary>
    [Fact]
    public void DirtyImageIsRepairedOnWritableOpen()
    {
        using var dir = new TempDir();
        var path = dir.File("dirty.qcow2");
        QemuTools.Img("create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on,cluster_size=4096", path, "4M").EnsureSuccess();
        QemuTools.Io("-f", "qcow2", "-c", "write -q -P 0x5a 0 300k", "-c", "write -q -P 0x6b 2M 64k", "-c", "flush", "-c", "abort", path);
        var h = Load(path);
        (h.U64(IncompatibleFeatures) & 1).Should().Be(1UL, "the abort left the image dirty");
        var stale = QemuTools.Check(path);
        stale.Clean.Should().BeFalse("the refcounts on disk are stale: this is what needs repairing");
        var expected = QemuTools.ReadRaw(path, dir);

        // Read-only: nothing is repaired or written.
        var before = File.ReadAllBytes(path);
        using (var ro = QcowImage.Open(path, new QcowOpenOptions { ReadOnly = true }))
        {
            ro.GetInfo().Dirty.Should().BeTrue();
            var buf = new byte[ro.Size];
            ro.Read(0, buf);
            QemuTools.AssertBytesEqual(expected, buf, "read-only content of the dirty image");
        }
        File.ReadAllBytes(path).Should().Equal(before);

        using (var rw = QcowImage.Open(path))
        {
            rw.GetInfo().Dirty.Should().BeFalse("the writable open repaired the image");
            rw.Write(1 << 20, new byte[] { 1, 2, 3 });
        }
        expected[1 << 20] = 1;
        expected[(1 << 20) + 1] = 2;
        expected[(1 << 20) + 2] = 3;
        (Load(path).U64(IncompatibleFeatures) & 1).Should().Be(0UL);
        QemuTools.AssertClean(path);
        QemuTools.AssertBytesEqual(expected, QemuTools.ReadRaw(path, dir), "content after repair");
    }
}
