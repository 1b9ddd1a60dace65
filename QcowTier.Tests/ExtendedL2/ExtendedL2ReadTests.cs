using QcowTier.Tests.Cli;
using QcowTier.Tests.Hostile.Support;
using QcowTier.Tests.Infrastructure;
using QcowTier.Tests.Interop.Support;

namespace QcowTier.Tests.ExtendedL2;

/// <summary>Images with extended L2 entries (subclusters) that QEMU wrote: read, mapped and checked as QEMU does.</summary>
public sealed class ExtendedL2ReadTests
{
    private static readonly QcowOpenOptions ReadOnly = new() { ReadOnly = true };

    /// <summary>qemu-io writes of odd subcluster ranges, zeroes, unmaps, discards and compressed clusters.</summary>
    private static string QemuImage(TempDir dir, int clusterSize, string name = "xl2.qcow2")
    {
        var path = dir.File(name);
        var sc = clusterSize / 32;
        var size = 48L * clusterSize;
        QemuTools.Img("create", "-q", "-f", "qcow2", "-o", $"extended_l2=on,cluster_size={clusterSize}", path, size.ToString(System.Globalization.CultureInfo.InvariantCulture)).EnsureSuccess();
        string[] commands =
        [
            $"write -P 1 {sc} {sc}",                           // one subcluster of cluster 0
            $"write -P 2 {3 * sc + 100} 700",                  // part of a subcluster
            $"write -P 3 {clusterSize - 5} 10",                // across a cluster boundary
            $"write -P 4 {2L * clusterSize} {clusterSize}",    // a whole cluster
            $"write -z {2L * clusterSize + 4 * sc} {3 * sc}",  // zeroed subclusters of an allocated cluster
            $"write -z {5L * clusterSize} {clusterSize}",      // a zero cluster
            $"write -P 5 {6L * clusterSize + 7 * sc} {9 * sc}",
            $"write -z -u {6L * clusterSize} {clusterSize}",   // unmapped again
            $"write -P 6 {8L * clusterSize} {3L * clusterSize}",
            $"discard {9L * clusterSize} {clusterSize}",
            $"write -c -P 7 {12L * clusterSize} {2L * clusterSize}",
            $"write -P 8 {20L * clusterSize + 31 * sc} {2 * sc}",
            $"write -z {21L * clusterSize + 5 * sc} {sc}",     // a zero subcluster in an unallocated cluster
        ];
        var args = new List<string> { "-f", "qcow2" };
        foreach (var c in commands)
        {
            args.AddRange(["-c", c]);
        }
        args.Add(path);
        QemuTools.Io([.. args]).EnsureSuccess();
        return path;
    }

    [Theory]
    [InlineData(16384)]
    [InlineData(65536)]
    [InlineData(2 << 20)]
    public async Task QemuExtendedL2ImageReadsMapsAndChecksAsQemu(int clusterSize)
    {
        using var dir = new TempDir();
        var path = QemuImage(dir, clusterSize);
        var raw = QemuTools.ReadRaw(path, dir);
        using (var img = QcowImage.Open(path, ReadOnly))
        {
            img.GetInfo().ExtendedL2.Should().BeTrue();
            var whole = new byte[img.Size];
            img.Read(0, whole);
            QemuTools.AssertBytesEqual(raw, whole, "whole disk");
            var rng = new Random(clusterSize);
            for (var i = 0; i < 60; i++)
            {
                var off = rng.NextInt64(0, img.Size - 1);
                var buf = new byte[(int)Math.Min(img.Size - off, rng.Next(1, 3 * clusterSize))];
                await img.ReadAsync(off, buf);
                QemuTools.AssertBytesEqual(raw.AsSpan((int)off, buf.Length), buf, $"read at {off}+{buf.Length}");
            }
            var check = img.Check();
            check.Corruptions.Should().Be(0);
            check.Leaks.Should().Be(0);
            check.CompressedClusters.Should().Be(2);
        }
        CliHarness.Run("map", "--output=json", path).StdOut.Should().Be(QemuTools.Img("map", "--output=json", path).StdOut);
        CliHarness.Run("info", path).StdOut.Should().Contain("extended l2: true");
        var ours = CliHarness.Run("check", "--output=json", path);
        var theirs = QemuTools.Img("check", "--output=json", path);
        ours.StdOut.Should().Be(theirs.StdOut.Replace(path, path, StringComparison.Ordinal));
    }

    [Fact]
    public void InvalidSubclusterBitmapsAreCorruptionAsForQemu()
    {
        using var dir = new TempDir();
        var path = QemuImage(dir, 65536);
        var img = HostileImage.Load(path);
        var l2 = img.L2Offset;
        // Cluster 0: allocated, with subcluster 1 both allocated and zero; cluster 7: unallocated with an allocation bit.
        img.SetU64(l2 + 8, img.U64(l2 + 8) | (1UL << 33));
        img.SetU64(l2 + 7 * 16 + 8, 1UL << 3);
        img.Save();
        var qemu = QemuTools.Check(path);
        qemu.Corruptions.Should().Be(2);
        using var ro = QcowImage.Open(path, ReadOnly);
        ((long)ro.Check().Corruptions).Should().Be(qemu.Corruptions);
        Guard.Fails<QcowCorruptImageException>(() => ro.Read(0, new byte[4096]), "Invalid cluster entry");
        Guard.Fails<QcowCorruptImageException>(() => ro.Read(7L * 65536, new byte[4096]), "Invalid cluster entry");
        var buf = new byte[65536];
        ro.Read(2L * 65536, buf); // a valid cluster still reads
        buf[0].Should().Be(4);
    }

    [Fact]
    public void ExtendedL2NeedsClustersOfAtLeast16K()
    {
        using var dir = new TempDir();
        var path = QemuImage(dir, 16384);
        var img = HostileImage.Load(path);
        img.SetU32(HostileImage.ClusterBits, 13);
        img.Save();
        Guard.Run(() => QcowImage.Open(path, ReadOnly).Dispose()).Should().BeAssignableTo<QcowFormatException>();
    }
}
