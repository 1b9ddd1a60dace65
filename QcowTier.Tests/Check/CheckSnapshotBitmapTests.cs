using System.Buffers.Binary;
using QcowTier.Format;
using QcowTier.Tests.Infrastructure;

namespace QcowTier.Tests.Check;

/// <summary>Internal snapshots (shared clusters, refcounts above one), persistent bitmaps, and images left dirty.</summary>
public sealed class CheckSnapshotBitmapTests
{
    internal static string BuildWithSnapshots(TempDir dir)
    {
        var path = dir.File("snap.qcow2");
        CheckHarness.QemuImgOk("create", "-f", "qcow2", path, "64M");
        CheckHarness.QemuIoOk(path, "write -P 1 0 1M", "write -c -P 9 8M 64k");
        CheckHarness.QemuImgOk("snapshot", "-c", "s1", path);
        CheckHarness.QemuIoOk(path, "write -P 2 512k 1M");
        CheckHarness.QemuImgOk("snapshot", "-c", "s2", path);
        CheckHarness.QemuIoOk(path, "write -P 3 0 64k", "write -P 4 30M 64k");
        return path;
    }

    [Fact]
    public void Snapshots_figures_match_qemu()
    {
        using var dir = new TempDir();
        var path = BuildWithSnapshots(dir);

        var qemu = CheckHarness.Qemu(path);
        qemu.ExitCode.Should().Be(0, qemu.ToString());
        CheckHarness.Ours(path).ShouldMatchFigures(qemu);
    }

    /// <summary>Snapshot damage: a shared cluster's refcount, a COPIED flag on a shared entry, a snapshot's L1 offset.</summary>
    public static TheoryData<string> SnapshotDamages() => ["shared-refcount-lowered", "shared-refcount-raised", "copied-set-on-shared", "snapshot-l1-misaligned"];

    [Theory]
    [MemberData(nameof(SnapshotDamages))]
    public void Snapshot_damage_counts_match_qemu_and_repair_matches(string damage)
    {
        using var dir = new TempDir();
        var pristine = BuildWithSnapshots(dir);
        var damaged = CheckHarness.Copy(dir, pristine, "damaged.qcow2");
        var img = new RawImage(damaged);
        // Guest cluster 3 was written before both snapshots and never since: shared three ways.
        const int guest = 3;
        var shared = img.HostCluster(guest);
        img.Refcount(shared).Should().Be(3);
        switch (damage)
        {
            case "shared-refcount-lowered":
                img.SetRefcount(shared, 2);
                break;
            case "shared-refcount-raised":
                img.SetRefcount(shared, 4);
                break;
            case "copied-set-on-shared":
                img.WriteU64(img.L2EntryOffset(guest), img.L2Entry(guest) | ClusterLayout.Copied);
                break;
            default:
                {
                    // The first snapshot table entry starts with its L1 table offset.
                    var table = (long)img.ReadU64(64);
                    img.WriteU64(table, img.ReadU64(table) + 0x200);
                    break;
                }
        }

        var qemu = CheckHarness.Qemu(CheckHarness.Copy(dir, damaged, "q.qcow2"));
        qemu.ExitCode.Should().NotBe(0, qemu.ToString());
        // The engine opens images with snapshots read-only only, so repairs go straight to the checker.
        CheckHarness.OursDirect(CheckHarness.Copy(dir, damaged, "o.qcow2")).ShouldMatch(qemu);
        CheckHarness.Ours(CheckHarness.Copy(dir, damaged, "o2.qcow2")).ShouldMatch(qemu);

        var theirs = CheckHarness.Copy(dir, damaged, "theirs.qcow2");
        CheckHarness.Qemu(theirs, "all");
        var qemuAfter = CheckHarness.Qemu(theirs);
        var ours = CheckHarness.Copy(dir, damaged, "ours.qcow2");
        var repaired = CheckHarness.OursDirect(ours, QcowRepairMode.All);
        var after = CheckHarness.Qemu(ours);
        var because = $"qemu-img after our repair: {after}\nafter its own: {qemuAfter}\nours: {CheckHarness.Describe(repaired)}";
        repaired.Corruptions.Should().Be((int)after.Corruptions, because);
        repaired.Leaks.Should().Be((int)after.Leaks, because);
        after.Corruptions.Should().BeLessThanOrEqualTo(qemuAfter.Corruptions, because);
        after.Leaks.Should().BeLessThanOrEqualTo(qemuAfter.Leaks, because);
        if (qemuAfter.ExitCode == 0)
        {
            after.ExitCode.Should().Be(0, because);
            Qemu.AssertSameContent(pristine, ours);
            // Every snapshot still reads as it did.
            foreach (var sn in new[] { "s1", "s2" })
            {
                var a = dir.File($"a-{sn}.raw");
                var b = dir.File($"b-{sn}.raw");
                CheckHarness.QemuImgOk("convert", "-f", "qcow2", "-O", "raw", "-l", $"snapshot.name={sn}", pristine, a);
                CheckHarness.QemuImgOk("convert", "-f", "qcow2", "-O", "raw", "-l", $"snapshot.name={sn}", ours, b);
                Qemu.AssertSameContent(a, b, "raw", "raw");
            }
        }
    }

    [Fact]
    public void Incomplete_v3_snapshot_entry_is_a_corruption_as_in_qemu()
    {
        using var dir = new TempDir();
        var path = BuildWithSnapshots(dir);
        // Cut the last entry's extra data to 8 bytes (v3 wants 16), moving its id and name up behind it.
        var bytes = File.ReadAllBytes(path);
        var count = (int)BinaryPrimitives.ReadUInt32BigEndian(bytes.AsSpan(QcowHeader.OffsetNbSnapshots));
        var pos = (int)BinaryPrimitives.ReadUInt64BigEndian(bytes.AsSpan(QcowHeader.OffsetSnapshotsOffset));
        for (var i = 0; i < count - 1; i++)
        {
            pos += EntryLength(bytes, pos);
            pos = (pos + 7) & ~7;
        }
        var extra = (int)BinaryPrimitives.ReadUInt32BigEndian(bytes.AsSpan(pos + 36));
        extra.Should().BeGreaterThanOrEqualTo(16);
        var names = BinaryPrimitives.ReadUInt16BigEndian(bytes.AsSpan(pos + 12)) + BinaryPrimitives.ReadUInt16BigEndian(bytes.AsSpan(pos + 14));
        bytes.AsSpan(pos + 40 + extra, names).CopyTo(bytes.AsSpan(pos + 40 + 8));
        BinaryPrimitives.WriteUInt32BigEndian(bytes.AsSpan(pos + 36), 8);
        File.WriteAllBytes(path, bytes);

        var qemu = CheckHarness.Qemu(path);
        qemu.Corruptions.Should().BeGreaterThan(0, qemu.ToString());
        CheckHarness.Ours(path).ShouldMatch(qemu);
    }

    private static int EntryLength(byte[] image, int pos)
        => 40 + (int)BinaryPrimitives.ReadUInt32BigEndian(image.AsSpan(pos + 36))
           + BinaryPrimitives.ReadUInt16BigEndian(image.AsSpan(pos + 12)) + BinaryPrimitives.ReadUInt16BigEndian(image.AsSpan(pos + 14));

    private static string BuildWithBitmaps(TempDir dir)
    {
        var path = dir.File("bitmaps.qcow2");
        CheckHarness.QemuImgOk("create", "-f", "qcow2", path, "64M");
        CheckHarness.QemuImgOk("bitmap", "--add", path, "coarse");
        CheckHarness.QemuImgOk("bitmap", "--add", "-g", "512", path, "fine");
        // qemu-io loads the persistent bitmaps, dirties them and stores them back with data clusters.
        CheckHarness.QemuIoOk(path, "write -P 1 0 1M", "write -P 2 40M 64k");
        return path;
    }

    [Fact]
    public void Bitmap_clusters_are_counted_as_qemu_counts_them()
    {
        using var dir = new TempDir();
        var path = BuildWithBitmaps(dir);

        var qemu = CheckHarness.Qemu(path);
        qemu.ExitCode.Should().Be(0, qemu.ToString());
        var ours = CheckHarness.Ours(path);
        ours.ShouldMatchFigures(qemu);

        // Without the autoclear bit the bitmaps are stale: their clusters are leaks, for both tools.
        var stale = CheckHarness.Copy(dir, path, "stale.qcow2");
        var img = new RawImage(stale);
        img.WriteU64(QcowHeader.OffsetAutoclearFeatures, img.ReadU64(QcowHeader.OffsetAutoclearFeatures) & ~QcowHeader.AutoclearBitmaps);
        var staleQemu = CheckHarness.Qemu(stale);
        staleQemu.Leaks.Should().BeGreaterThan(0, staleQemu.ToString());
        CheckHarness.Ours(stale).ShouldMatch(staleQemu);
    }

    [Fact]
    public void Writable_open_keeps_bitmaps_and_leak_repair_finds_nothing()
    {
        using var dir = new TempDir();
        var path = BuildWithBitmaps(dir);

        // The engine maintains bitmaps (Bitmaps/BitmapTests): a writable open keeps the autoclear bit and their clusters.
        var result = CheckHarness.Ours(path, QcowRepairMode.Leaks);

        result.LeaksFixed.Should().Be(0);
        result.IsClean.Should().BeTrue(CheckHarness.Describe(result));
        Qemu.AssertClean(path);
    }

    [Fact]
    public void Broken_bitmap_table_fails_the_check_like_qemu()
    {
        using var dir = new TempDir();
        var path = BuildWithBitmaps(dir);
        var img = new RawImage(path);
        var ext = FindBitmapsExtension(path);
        var directory = (long)BinaryPrimitives.ReadUInt64BigEndian(ext.AsSpan(16));
        var table = (long)img.ReadU64(directory);
        // A reserved bit in the first bitmap table entry.
        img.WriteU64(table, img.ReadU64(table) | (1UL << 60));

        var qemu = CheckHarness.Qemu(path);
        qemu.ExitCode.Should().Be(1, qemu.ToString());
        var ours = CheckHarness.Ours(path);
        ours.ExitCode.Should().Be(1, CheckHarness.Describe(ours));
    }

    private static byte[] FindBitmapsExtension(string path)
    {
        var head = new byte[65536];
        using (var f = File.OpenRead(path))
        {
            f.ReadAtLeast(head, head.Length, throwOnEndOfStream: false);
        }
        var pos = (int)BinaryPrimitives.ReadUInt32BigEndian(head.AsSpan(QcowHeader.OffsetHeaderLength));
        while (true)
        {
            var type = BinaryPrimitives.ReadUInt32BigEndian(head.AsSpan(pos));
            var len = (int)BinaryPrimitives.ReadUInt32BigEndian(head.AsSpan(pos + 4));
            type.Should().NotBe(0u, "the image has a bitmaps extension");
            if (type == HeaderExtension.Bitmaps)
            {
                return head.AsSpan(pos + 8, len).ToArray();
            }
            pos += 8 + ((len + 7) & ~7);
        }
    }

    [Fact]
    public void Image_left_dirty_by_a_crash_matches_qemu_and_is_repaired_on_open()
    {
        using var dir = new TempDir();
        var path = dir.File("dirty.qcow2");
        CheckHarness.QemuImgOk("create", "-f", "qcow2", "-o", "lazy_refcounts=on", path, "64M");
        // With lazy refcounts the refcounts live only in memory until a clean close; abort skips it.
        var crash = Qemu.Io("-f", "qcow2", "-c", "write -P 1 0 1M", "-c", "write -P 2 5M 64k", "-c", "abort", path);
        crash.ExitCode.Should().NotBe(0);
        var reference = dir.File("reference.qcow2");
        CheckHarness.QemuImgOk("create", "-f", "qcow2", reference, "64M");
        CheckHarness.QemuIoOk(reference, "write -P 1 0 1M", "write -P 2 5M 64k");

        var qemu = CheckHarness.Qemu(CheckHarness.Copy(dir, path, "q.qcow2"));
        qemu.Corruptions.Should().BeGreaterThan(0, qemu.ToString());
        CheckHarness.Ours(path).ShouldMatch(qemu);

        // A writable open of a dirty image rebuilds its refcounts, as QEMU does.
        using (QcowImage.Open(path))
        {
        }
        Qemu.AssertClean(path);
        Qemu.AssertSameContent(reference, path);
    }

    [Fact]
    public void Refcount_overflow_with_one_bit_refcounts_matches_qemu()
    {
        using var dir = new TempDir();
        var path = dir.File("narrow.qcow2");
        CheckHarness.QemuImgOk("create", "-f", "qcow2", "-o", "refcount_bits=1", path, "64M");
        CheckHarness.QemuIoOk(path, "write -P 1 0 256k");
        var img = new RawImage(path);
        // Two guest clusters on one host cluster: two references cannot be counted in one bit.
        img.WriteU64(img.L2EntryOffset(1), img.L2Entry(0));

        var qemu = CheckHarness.Qemu(path);
        qemu.Corruptions.Should().BeGreaterThan(0, qemu.ToString());
        var ours = CheckHarness.Ours(path);
        ours.ShouldMatch(qemu);
        ours.Messages.Should().Contain(m => m.StartsWith("ERROR: overflow cluster offset=", StringComparison.Ordinal));
    }
}
