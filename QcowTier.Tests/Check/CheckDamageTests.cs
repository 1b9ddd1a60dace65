using QcowTier.Format;
using QcowTier.Tests.Infrastructure;

namespace QcowTier.Tests.Check;

/// <summary>
/// Damage an image byte-wise, then hold our check against qemu-img check on identical copies, and
/// our repair against what qemu-img sees afterwards.
/// </summary>
public sealed class CheckDamageTests
{
    // Guest clusters of the base image (64 KiB clusters): 0-15 data, 32 compressed, 160 data, 480 preallocated zero.
    private const long CompressedCluster = 32;
    private const long ZeroAllocCluster = 480;

    /// <summary>One kind of damage and what a repair can achieve, by QEMU's rules.</summary>
    /// <param name="Name">Test case name.</param>
    /// <param name="Damage">What to break.</param>
    /// <param name="GuestDataIntact">The damage leaves every guest-visible byte as it was.</param>
    /// <param name="CleanAfterLeaks">qemu-img check finds nothing after -r leaks.</param>
    /// <param name="CleanAfterAll">qemu-img check finds nothing after -r all.</param>
    /// <param name="QemuWritesThroughBadTable">
    /// QEMU's -r all "repairs" entries of a table that is not where any table can be (writing into
    /// whatever lies there, guest data included); we refuse, so we may leave more errors reported.
    /// </param>
    public sealed record Damage(string Name, Action<RawImage> Apply, bool GuestDataIntact, bool CleanAfterLeaks, bool CleanAfterAll, bool QemuWritesThroughBadTable = false)
    {
        public override string ToString() => Name;
    }

    internal static readonly Damage[] Damages =
    [
        new("raised-refcount", img => img.SetRefcount(img.HostCluster(0), 2), true, true, true),
        new("orphan-cluster", img =>
        {
            // A cluster past the last one in use, with a refcount but no reference: a leak.
            var cluster = (img.Length + img.ClusterSize - 1) / img.ClusterSize;
            img.WriteBytes(cluster * img.ClusterSize, new byte[img.ClusterSize]);
            img.SetRefcount(cluster, 1);
        }, true, true, true),
        new("zeroed-refcount", img => img.SetRefcount(img.HostCluster(1), 0), true, false, true),
        new("lowered-refcount-of-shared", img =>
        {
            // Guest cluster 1 now shares guest cluster 0's host cluster: referenced twice, counted once.
            img.WriteU64(img.L2EntryOffset(1), img.L2Entry(0));
        }, false, false, true),
        new("copied-cleared-l2", img => img.WriteU64(img.L2EntryOffset(0), img.L2Entry(0) & ~ClusterLayout.Copied), true, true, true),
        new("copied-cleared-l1", img => img.WriteU64(img.L1EntryOffset(0), img.L1Entry(0) & ~ClusterLayout.Copied), true, true, true),
        new("copied-set-compressed", img => img.WriteU64(img.L2EntryOffset(CompressedCluster), img.L2Entry(CompressedCluster) | ClusterLayout.Copied), true, false, false),
        new("l2-offset-misaligned", img => img.WriteU64(img.L1EntryOffset(0), img.L1Entry(0) + 0x200), false, false, false, QemuWritesThroughBadTable: true),
        new("l1-entry-past-eof", img => img.WriteU64(img.L1EntryOffset(0), ClusterLayout.Copied | 0x10000000), false, false, false),
        new("data-past-eof", img => img.WriteU64(img.L2EntryOffset(2), ClusterLayout.Copied | 0x10000000), false, false, false),
        new("data-misaligned", img => img.WriteU64(img.L2EntryOffset(3), img.L2Entry(3) + 0x200), false, false, false),
        new("prealloc-zero-misaligned", img => img.WriteU64(img.L2EntryOffset(ZeroAllocCluster), img.L2Entry(ZeroAllocCluster) + 0x200), true, false, true),
        new("l2-reserved-bits", img => img.WriteU64(img.L2EntryOffset(0), img.L2Entry(0) | 0x2), true, false, false),
        new("l1-reserved-bits", img => img.WriteU64(img.L1EntryOffset(0), img.L1Entry(0) | 0x2), true, false, false),
        new("refblock-misaligned", img => img.WriteU64(img.RefcountTableEntryOffset(0), img.RefcountTableEntry(0) + 0x200), true, false, true),
        new("reftable-reserved-bits", img => img.WriteU64(img.RefcountTableEntryOffset(0), img.RefcountTableEntry(0) | 0x1), true, false, true),
        new("reftable-entry-zeroed", img => img.WriteU64(img.RefcountTableEntryOffset(0), 0), true, false, true),
        new("refblock-outside-image", img =>
        {
            var past = (img.Length + img.ClusterSize - 1) / img.ClusterSize + 2;
            img.WriteU64(img.RefcountTableEntryOffset(0), (ulong)(past * img.ClusterSize));
        }, true, false, true),
        new("refblock-overlaps-l1", img => img.WriteU64(img.RefcountTableEntryOffset(0), (ulong)img.L1Offset), true, false, true),
    ];

    public static TheoryData<Damage> Cases()
    {
        var data = new TheoryData<Damage>();
        foreach (var d in Damages)
        {
            data.Add(d);
        }
        return data;
    }

    internal static string BuildBase(TempDir dir, string createOptions = "")
    {
        var path = dir.File("base.qcow2");
        var args = new List<string> { "create", "-f", "qcow2" };
        if (createOptions.Length > 0)
        {
            args.Add("-o");
            args.Add(createOptions);
        }
        args.Add(path);
        args.Add("64M");
        CheckHarness.QemuImgOk([.. args]);
        CheckHarness.QemuIoOk(path,
            "write -P 0x11 0 1M",
            "write -P 0x22 10M 64k",
            "write -c -P 0x33 2M 64k",
            "write -P 0x44 30M 64k",
            "write -z 30M 64k");
        return path;
    }

    [Theory]
    [MemberData(nameof(Cases))]
    public void Check_counts_match_qemu(Damage damage)
    {
        using var dir = new TempDir();
        var damaged = BuildBase(dir);
        damage.Apply(new RawImage(damaged));

        var qemu = CheckHarness.Qemu(CheckHarness.Copy(dir, damaged, "q.qcow2"));
        var ours = CheckHarness.Ours(CheckHarness.Copy(dir, damaged, "o.qcow2"));

        qemu.ExitCode.Should().NotBe(0, "the damage must be visible to qemu-img");
        ours.ShouldMatch(qemu);
        // Line for line what qemu-img prints about the image (its own "qemu-img: ..." lines aside).
        var qemuLines = qemu.StdErr.Split('\n', StringSplitOptions.RemoveEmptyEntries).Where(l => !l.StartsWith("qemu-img:", StringComparison.Ordinal));
        ours.Messages.Should().Equal(qemuLines);
    }

    [Theory]
    [MemberData(nameof(Cases))]
    public void Repair_leaks_then_qemu_agrees(Damage damage) => Repair(damage, QcowRepairMode.Leaks, "leaks", damage.CleanAfterLeaks);

    [Theory]
    [MemberData(nameof(Cases))]
    public void Repair_all_then_qemu_agrees(Damage damage) => Repair(damage, QcowRepairMode.All, "all", damage.CleanAfterAll);

    private static void Repair(Damage damage, QcowRepairMode mode, string qemuMode, bool expectClean)
    {
        using var dir = new TempDir();
        var pristine = BuildBase(dir);
        var damaged = CheckHarness.Copy(dir, pristine, "damaged.qcow2");
        damage.Apply(new RawImage(damaged));
        var before = CheckHarness.Qemu(CheckHarness.Copy(dir, damaged, "before.qcow2"));

        var ours = CheckHarness.Copy(dir, damaged, "ours.qcow2");
        var result = CheckHarness.Ours(ours, mode);
        var after = CheckHarness.Qemu(ours);
        var because = $"before: {before}\nour repair: {CheckHarness.Describe(result)}\nqemu-img after our repair: {after}";

        after.HasReport.Should().BeTrue(because);
        // A repair never makes anything worse.
        after.Corruptions.Should().BeLessThanOrEqualTo(before.Corruptions, because);
        after.Leaks.Should().BeLessThanOrEqualTo(before.Leaks, because);

        // Hold the outcome against QEMU's own repair of the same damage.
        var theirs = CheckHarness.Copy(dir, damaged, "theirs.qcow2");
        var qemuRepair = CheckHarness.Qemu(theirs, qemuMode);
        var qemuAfter = CheckHarness.Qemu(theirs);
        because += $"\nqemu-img -r {qemuMode}: {qemuRepair}\nqemu-img after its own repair: {qemuAfter}";
        if (qemuRepair.HasReport || result.ExitCode != 1)
        {
            // What we report after repairing is what qemu-img finds in the repaired image.
            result.Corruptions.Should().Be((int)after.Corruptions, because);
            result.Leaks.Should().Be((int)after.Leaks, because);
            result.CheckErrors.Should().Be((int)after.CheckErrors, because);
        }
        else
        {
            // Where qemu-img gives up ("Check failed"), so may we, having changed nothing.
            File.ReadAllBytes(ours).SequenceEqual(File.ReadAllBytes(damaged)).Should().BeTrue(because);
        }
        if (expectClean)
        {
            after.ExitCode.Should().Be(0, because);
        }
        if (qemuAfter.HasReport && qemuAfter.ExitCode == 0)
        {
            after.ExitCode.Should().Be(0, "QEMU repairs this damage, so must we\n" + because);
        }
        if (qemuRepair.HasReport && !damage.QemuWritesThroughBadTable)
        {
            after.Corruptions.Should().BeLessThanOrEqualTo(qemuAfter.Corruptions, because);
            after.Leaks.Should().BeLessThanOrEqualTo(qemuAfter.Leaks, because);
            // The same repairs, counted the same way.
            result.CorruptionsFixed.Should().Be((int)qemuRepair.CorruptionsFixed, because);
            result.LeaksFixed.Should().Be((int)qemuRepair.LeaksFixed, because);
        }

        if (damage.GuestDataIntact && (after.ExitCode == 0 || Qemu.Img("compare", pristine, damaged).ExitCode == 0))
        {
            // Clean images must read as before; so must images QEMU could read before our repair.
            Qemu.AssertSameContent(pristine, ours);
        }
        else if (after.ExitCode == 0 && qemuAfter.ExitCode == 0)
        {
            // Whatever the damage did to the guest's view, our repair must not change it further than QEMU's.
            Qemu.AssertSameContent(theirs, ours);
        }
    }
}
