using System.Diagnostics;
using QcowTier.Tests.Infrastructure;

namespace QcowTier.Tests.Check;

/// <summary>A 1 TiB image with every cluster allocated (16 million clusters): the check must keep pace with qemu-img.</summary>
public sealed class CheckBigImageTests
{
    [Fact]
    [Trait("Category", "Heavy")]
    public void Fully_allocated_terabyte_image_is_checked_about_as_fast_as_qemu_does()
    {
        using var dir = new TempDir();
        var path = dir.File("big.qcow2");
        // Metadata preallocation maps every guest cluster to a (sparse) host cluster.
        CheckHarness.QemuImgOk("create", "-f", "qcow2", "-o", "preallocation=metadata", path, "1T");

        var qemuTime = Stopwatch.StartNew();
        var qemu = CheckHarness.Qemu(path);
        qemuTime.Stop();
        var ourTime = Stopwatch.StartNew();
        var ours = CheckHarness.Ours(path);
        ourTime.Stop();

        ours.ShouldMatchFigures(qemu);
        ours.AllocatedClusters.Should().Be(16L << 20);
        ourTime.Elapsed.Should().BeLessThan(qemuTime.Elapsed * 4 + TimeSpan.FromSeconds(5), $"qemu-img took {qemuTime.Elapsed}");

        // A leak in the last refcount block, repaired in place.
        var img = new RawImage(path);
        var last = (img.Length - 1) / img.ClusterSize;
        img.SetRefcount(last, 2);
        var repairTime = Stopwatch.StartNew();
        var repaired = CheckHarness.Ours(path, QcowRepairMode.Leaks);
        repairTime.Stop();
        repaired.LeaksFixed.Should().Be(1);
        repaired.IsClean.Should().BeTrue();
        repairTime.Elapsed.Should().BeLessThan(qemuTime.Elapsed * 8 + TimeSpan.FromSeconds(10), $"qemu-img took {qemuTime.Elapsed} to check");
        Qemu.AssertClean(path);
    }
}
