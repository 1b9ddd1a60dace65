using QcowTier.Tests.Hostile.Support;
using QcowTier.Tests.Infrastructure;
using QcowTier.Tests.Interop.Support;
using static QcowTier.Tests.Hostile.Support.HostileImage;

namespace QcowTier.Tests.Hostile;

/// <summary>
/// Damaged L1, L2 and refcount tables: pointers outside the file, misaligned, into other metadata,
/// into themselves. Reads either return what QEMU returns or fail typed; writes that would land on
/// metadata are refused as QEMU refuses them ("Preventing invalid write on metadata"), the image is
/// marked corrupt and the metadata is left intact.
/// </summary>
public sealed class TableTests
{
    private static readonly QcowOpenOptions ReadOnly = new() { ReadOnly = true };

    private static byte[] ReadAll(string path)
    {
        using var img = QcowImage.Open(path, ReadOnly);
        var buf = new byte[img.Size];
        img.Read(0, buf);
        return buf;
    }

    private static bool CorruptBitSet(string path) => (Load(path).U64(IncompatibleFeatures) & 2) != 0;

    // ------------------------------------------------------------------ pointers outside the file / misaligned

    [Fact]
    public void MisalignedL1EntryFailsReadsTypedAndMarksCorruptOnlyWhenWritable()
    {
        using var dir = new TempDir();
        var img = CreateBase(dir);
        var l2 = img.L2Offset;
        img.SetU64(img.L1Offset, Copied | (ulong)(l2 + 512));
        var path = img.Save();

        var buf = new byte[65536];
        var e = Guard.Fails<QcowCorruptImageException>(() =>
        {
            using var q = QcowImage.Open(path, ReadOnly);
            q.Read(0, buf);
        }, "L2 table offset", "unaligned", "L1 index");
        e.Offset.Should().Be(img.L1Offset, "the exception points at the L1 entry");
        CorruptBitSet(path).Should().BeFalse("a read-only open never writes");

        // QEMU says the same thing.
        var qr = QemuTools.Io("-f", "qcow2", "-r", "-c", "read -q 0 64k", path);
        (qr.StdOut + qr.StdErr).Should().Contain($"L2 table offset 0x{l2 + 512:x} unaligned (L1 index: 0)");
        e.Message.Should().Contain($"L2 table offset 0x{l2 + 512:x} unaligned");

        Guard.Fails<QcowCorruptImageException>(() =>
        {
            using var q = QcowImage.Open(path);
            q.Write(0, new byte[10]);
        }, "unaligned", "marked corrupt");
        CorruptBitSet(path).Should().BeTrue("a writable image is marked corrupt, as QEMU does");
        Guard.Fails<QcowCorruptImageException>(() => QcowImage.Open(path).Dispose(), "corrupt");
        // Read-only opens still work (the damage is only met when the table is used).
        Guard.Succeeds(() => QcowImage.Open(path, ReadOnly).Dispose());
    }

    [Theory]
    [InlineData("l1-entry-beyond-eof")]
    [InlineData("l2-entry-misaligned")]
    [InlineData("refcount-block-misaligned")]
    [InlineData("refcount-block-beyond-eof")]
    public void BadPointerFailsTyped(string which)
    {
        using var dir = new TempDir();
        var img = CreateBase(dir);
        string[] fragments;
        switch (which)
        {
            case "l1-entry-beyond-eof":
                img.SetU64(img.L1Offset, Copied | (1UL << 40));
                fragments = ["L2 table", "end of the file"];
                break;
            case "l2-entry-misaligned":
                img.SetU64(img.L2Offset, Copied | (ulong)(img.DataCluster(0) + 512));
                fragments = ["unaligned", "L2 offset"];
                break;
            case "refcount-block-misaligned":
                img.SetU64(img.RefcountTable, (ulong)img.RefcountBlock + 512);
                fragments = ["refcount block", "aligned"];
                break;
            default:
                img.SetU64(img.RefcountTable, 1UL << 40);
                fragments = ["refcount block", "end of the file"];
                break;
        }
        var path = img.Save();
        if (which[0] == 'l')
        {
            Guard.Fails<QcowCorruptImageException>(() =>
            {
                using var q = QcowImage.Open(path, ReadOnly);
                q.Read(0, new byte[4096]);
            }, fragments);
        }
        else
        {
            // Reads never look at refcounts; the first allocation does.
            byte[]? ours = null;
            Guard.Succeeds(() => ours = ReadAll(path));
            QemuTools.AssertBytesEqual(QemuTools.ReadRaw(path, dir), ours!, "read-only content");
            Guard.Fails<QcowCorruptImageException>(() =>
            {
                using var q = QcowImage.Open(path);
                q.Write(2 << 20, new byte[4096]);
            }, fragments);
        }
    }

    [Fact]
    public void L2EntryBeyondEndOfFileReadsZeroesLikeQemu()
    {
        using var dir = new TempDir();
        var img = CreateBase(dir);
        img.SetU64(img.L2Offset, Copied | (1UL << 36));
        var path = img.Save();
        var expected = QemuTools.ReadRaw(path, dir);
        byte[]? ours = null;
        Guard.Succeeds(() => ours = ReadAll(path));
        QemuTools.AssertBytesEqual(expected, ours!, "a data cluster past the end of the file reads as zeroes in QEMU too");
    }

    [Fact]
    public void ReservedBitsInEntriesAreIgnoredOnReadLikeQemu()
    {
        using var dir = new TempDir();
        var img = CreateBase(dir);
        img.SetU64(img.L1Offset, img.U64(img.L1Offset) | 0x2);
        img.SetU64(img.L2Offset, img.U64(img.L2Offset) | 0x2);
        var path = img.Save();
        var expected = QemuTools.ReadRaw(path, dir);
        byte[]? ours = null;
        Guard.Succeeds(() => ours = ReadAll(path));
        QemuTools.AssertBytesEqual(expected, ours!, "content");
    }

    // ------------------------------------------------------------------ truncated files

    [Fact]
    public void FileTruncatedInsideTheL2TableFailsTyped()
    {
        using var dir = new TempDir();
        var img = CreateBase(dir);
        img.Truncate(img.L2Offset + 100);
        var path = img.Save();
        Guard.Fails<QcowCorruptImageException>(() =>
        {
            using var q = QcowImage.Open(path, ReadOnly);
            q.Read(0, new byte[512]);
        }, "L2 table", "end of the file");
    }

    [Fact]
    public void FileTruncatedInsideADataClusterReadsLikeQemu()
    {
        using var dir = new TempDir();
        var img = CreateBase(dir);
        img.Truncate(img.DataCluster(0) + 0x8000);
        var path = img.Save();
        var expected = QemuTools.ReadRaw(path, dir);
        byte[]? ours = null;
        Guard.Succeeds(() => ours = ReadAll(path));
        QemuTools.AssertBytesEqual(expected, ours!, "the missing tail of a data cluster reads as zeroes in QEMU");
    }

    [Fact]
    public void FileTruncatedBeforeTheL1TableIsRefused()
    {
        using var dir = new TempDir();
        var img = CreateBase(dir);
        img.Truncate(img.L1Offset);
        var path = img.Save();
        Guard.Fails<QcowFormatException>(() => QcowImage.Open(path, ReadOnly).Dispose(), "l1_table_offset");
    }

    // ------------------------------------------------------------------ overlapping metadata

    public static TheoryData<string> Overlaps() => new()
    {
        "l1-entry-at-refcount-table",
        "l1-entry-at-refcount-block",
        "l1-entry-at-l1-table",
        "l2-entry-at-own-l2-table",
        "l2-entry-at-refcount-block",
        "l2-entry-at-refcount-table",
        "l2-entry-at-l1-table",
        "refcount-table-entry-at-refcount-table",
        "refcount-table-entry-at-l2-table",
        "refcount-table-entry-at-l1-table",
        "refcount-table-entry-zero",
        "l1-table-is-the-refcount-table",
    };

    /// <summary>
    /// Metadata pointing at other metadata. Reads give what QEMU gives (it does not check reads either);
    /// the first write that would land on metadata is refused like QEMU refuses it, the image is marked
    /// corrupt and no metadata byte has changed.
    /// </summary>
    [Theory]
    [MemberData(nameof(Overlaps))]
    public void OverlappingMetadataIsNeverOverwritten(string which)
    {
        using var dir = new TempDir();
        var img = CreateBase(dir);
        long guest; // a guest offset whose write must be refused
        string[] qemuWords; // the structure QEMU names (any of them: a cluster serving two roles may be named by either)
        switch (which)
        {
            case "l1-entry-at-refcount-table":
                img.SetU64(img.L1Offset, Copied | (ulong)img.RefcountTable);
                guest = 0;
                qemuWords = ["refcount table"];
                break;
            case "l1-entry-at-refcount-block":
                img.SetU64(img.L1Offset, Copied | (ulong)img.RefcountBlock);
                guest = 0;
                qemuWords = ["refcount block", "L2 table"];
                break;
            case "l1-entry-at-l1-table":
                img.SetU64(img.L1Offset, Copied | (ulong)img.L1Offset);
                guest = 0;
                qemuWords = ["L1 table"];
                break;
            case "l2-entry-at-own-l2-table":
                img.SetU64(img.L2Offset + 8, Copied | (ulong)img.L2Offset);
                guest = 65536;
                qemuWords = ["L2 table"];
                break;
            case "l2-entry-at-refcount-block":
                img.SetU64(img.L2Offset + 8, Copied | (ulong)img.RefcountBlock);
                guest = 65536;
                qemuWords = ["refcount block"];
                break;
            case "l2-entry-at-refcount-table":
                img.SetU64(img.L2Offset + 8, Copied | (ulong)img.RefcountTable);
                guest = 65536;
                qemuWords = ["refcount table"];
                break;
            case "l2-entry-at-l1-table":
                img.SetU64(img.L2Offset + 8, Copied | (ulong)img.L1Offset);
                guest = 65536;
                qemuWords = ["L1 table"];
                break;
            case "refcount-table-entry-at-refcount-table":
                img.SetU64(img.RefcountTable, (ulong)img.RefcountTable);
                guest = 2 << 20; // an allocating write
                qemuWords = [];
                break;
            case "refcount-table-entry-at-l2-table":
                img.SetU64(img.RefcountTable, (ulong)img.L2Offset);
                guest = 2 << 20;
                qemuWords = [];
                break;
            case "refcount-table-entry-at-l1-table":
                img.SetU64(img.RefcountTable, (ulong)img.L1Offset);
                guest = 2 << 20;
                qemuWords = [];
                break;
            case "l1-table-is-the-refcount-table":
                img.SetU64(L1TableOffset, (ulong)img.RefcountTable);
                guest = 0;
                qemuWords = [];
                break;
            default:
                img.SetU64(img.RefcountTable, 0);
                guest = 2 << 20;
                qemuWords = [];
                break;
        }
        var path = img.Save();
        var qemuCopy = img.Save(dir.File("qemu-copy.qcow2"));

        // Reads (read-only) return exactly what QEMU returns.
        var expected = QemuTools.ReadRaw(path, dir);
        byte[]? ours = null;
        var readError = Guard.SucceedsOrFailsTyped(() => ours = ReadAll(path));
        if (readError is null)
        {
            QemuTools.AssertBytesEqual(expected, ours!, "read-only content");
        }

        // QEMU refuses the write.
        var q = QemuTools.Io("-f", "qcow2", "-c", $"write -q -P 0x33 {guest} 4k", qemuCopy);
        (q.ExitCode != 0 || (q.StdOut + q.StdErr).Contains("corrupt", StringComparison.OrdinalIgnoreCase)).Should().BeTrue($"QEMU refuses too: {q.StdOut}{q.StdErr}");
        if (qemuWords.Length > 0)
        {
            var text = q.StdOut + q.StdErr;
            text.Should().Contain("overlaps with");
            qemuWords.Should().Contain(w => text.Contains(w, StringComparison.OrdinalIgnoreCase), text);
        }

        // So do we, with a typed exception, and nothing but the header's corrupt bit changes.
        var checkBefore = QemuTools.Check(path);
        var before = File.ReadAllBytes(path);
        var e = Guard.Fails<QcowCorruptImageException>(() =>
        {
            using var w = QcowImage.Open(path);
            w.Write(guest, Enumerable.Repeat((byte)0x33, 4096).ToArray());
            w.Flush();
        });
        e.Message.Should().NotBeNullOrWhiteSpace();
        if (qemuWords.Length > 0)
        {
            e.Message.Should().ContainEquivalentOf("overlaps with");
            qemuWords.Should().Contain(w => e.Message.Contains(w, StringComparison.OrdinalIgnoreCase), e.Message);
        }
        var after = File.ReadAllBytes(path);
        after.Length.Should().BeGreaterThanOrEqualTo(before.Length);
        for (var off = 0; off < before.Length; off += img.ClusterSize)
        {
            var a = before.AsSpan(off, img.ClusterSize);
            var b = after.AsSpan(off, img.ClusterSize);
            if (off == 0)
            {
                // Only the incompatible-features field may change (corrupt bit).
                a[..72].SequenceEqual(b[..72]).Should().BeTrue();
                a[80..].SequenceEqual(b[80..]).Should().BeTrue();
                continue;
            }
            // The tables must be byte-identical. (The refcount block may legitimately have gained the
            // increment of a cluster allocated before the refusal: that is a leak, judged below.)
            if ((off == img.L1Offset || off == img.L2Offset || off == img.RefcountTable) && off != img.RefcountBlock)
            {
                a.SequenceEqual(b).Should().BeTrue($"metadata cluster at 0x{off:x} must not change");
            }
        }
        CorruptBitSet(path).Should().BeTrue("the image is marked corrupt, as QEMU marks it");
        var checkAfter = QemuTools.Check(path);
        checkAfter.Corruptions.Should().BeLessThanOrEqualTo(checkBefore.Corruptions, $"the refused write added no corruption (leaks aside):\n{checkAfter.Raw}");
    }

    /// <summary>
    /// Refcounts claiming every cluster the table can describe is in use (every table entry aliasing one full
    /// block): the allocator has to go past all of it (16 TiB with 64 KiB clusters). QEMU fails with "File too
    /// large" on ext4; we must fail the same way, as an I/O error naming the file, or succeed where the file
    /// system allows it, never with anything else.
    /// </summary>
    [Fact]
    [Trait("Category", "Heavy")]
    public void RefcountsClaimingEverythingEndInAnIOErrorLikeQemu()
    {
        using var dir = new TempDir();
        var img = CreateBase(dir);
        var rb = img.RefcountBlock;
        for (var i = 0; i < img.ClusterSize; i += 8)
        {
            img.SetU64(rb + i, ulong.MaxValue);
        }
        for (var i = 0; i < img.ClusterSize / 8; i++)
        {
            img.SetU64(img.RefcountTable + i * 8, (ulong)rb);
        }
        var path = img.Save();
        var e = Guard.Run(() =>
        {
            using var q = QcowImage.Open(path);
            q.Write(3 << 20, new byte[4096]);
        }, TimeSpan.FromMinutes(3));
        if (e is not null)
        {
            e.Should().BeAssignableTo<IOException>(e.ToString());
            e.Should().NotBeAssignableTo<ArgumentException>();
            e.Message.Should().Contain(path);
        }
    }

    /// <summary>An L2 table whose entries point at the same data cluster twice (no COPIED flag): writes copy, never share.</summary>
    [Fact]
    public void SharedClustersWithoutCopiedFlagAreCopiedOnWrite()
    {
        using var dir = new TempDir();
        var img = CreateBase(dir);
        var d0 = img.DataCluster(0);
        img.SetU64(img.L2Offset, (ulong)d0);        // COPIED cleared
        img.SetU64(img.L2Offset + 8, (ulong)d0);    // guest cluster 1 shares it
        // Refcount 2 for the shared cluster, so the image is consistent.
        var idx = d0 / img.ClusterSize;
        var rb = img.RefcountBlock;
        img.SetU32(rb + idx * 2, (img.U32(rb + idx * 2) & 0x0000ffff) | (2u << 16));
        // (The cluster formerly at guest cluster 1 is now leaked; that does not matter here.)
        var path = img.Save();
        var copy = img.Save(dir.File("qemu.qcow2"));

        using (var w = QcowImage.Open(path))
        {
            w.Write(100, new byte[] { 1, 2, 3 });
        }
        QemuTools.Io("-f", "qcow2", "-c", "write -q -P 1 100 1", "-c", "write -q -P 2 101 1", "-c", "write -q -P 3 102 1", copy).EnsureSuccess();
        QemuTools.AssertSameContent(path, copy);
        var raw = QemuTools.ReadRaw(path, dir);
        raw[65536 + 100].Should().Be(0x11, "the other sharer keeps the old data");
    }
}
