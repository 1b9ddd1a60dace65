using QcowTier.Tests.Infrastructure;
using QcowTier.Tests.Interop.Support;

namespace QcowTier.Tests.Snapshots;

/// <summary>Internal snapshots made, applied and deleted by us and by QEMU, judged by qemu-img.</summary>
public sealed class SnapshotTests
{
    private static byte[] Pattern(int seed, int length)
    {
        var b = new byte[length];
        new Random(seed).NextBytes(b);
        return b;
    }

    /// <summary>The disk as QEMU reads a snapshot of it (qemu-img convert -l).</summary>
    internal static byte[] QemuSnapshotContent(string path, string snapshot, TempDir dir)
    {
        var raw = dir.File($"sn-{Guid.NewGuid():N}.raw");
        Qemu.Img("convert", "-f", "qcow2", "-l", $"snapshot.name={snapshot}", "-O", "raw", path, raw).EnsureSuccess();
        var bytes = File.ReadAllBytes(raw);
        File.Delete(raw);
        return bytes;
    }

    private static byte[] ReadAll(QcowImage img)
    {
        var b = new byte[img.Size];
        img.Read(0, b);
        return b;
    }

    [Theory]
    [InlineData("v3-64k", 65536, "1.1")]
    [InlineData("v3-512", 512, "1.1")]
    [InlineData("v2-4k", 4096, "0.10")]
    public void Create_write_apply_delete_stay_clean_and_match_qemu(string label, int clusterSize, string compat)
    {
        _ = label;
        using var dir = new TempDir();
        var path = dir.File("a.qcow2");
        Qemu.Img("create", "-f", "qcow2", "-o", $"cluster_size={clusterSize},compat={compat}", path, "4M").EnsureSuccess();
        Qemu.Io("-c", "write -P 1 0 256k", "-c", "write -P 2 1M 64k", path).EnsureSuccess();
        byte[] before, after;
        using (var img = QcowImage.Open(path))
        {
            var sn = img.CreateSnapshot("first");
            sn.Id.Should().Be("1");
            sn.DiskSize.Should().Be(4L << 20);
            before = ReadAll(img);
            img.Write(4096, Pattern(1, 100000));          // overwrites shared clusters: copy-on-write
            img.Write(3L << 20, Pattern(2, 70000));       // fresh clusters
            img.WriteZeroes(1L << 20, 64 << 10);
            img.Discard(128 << 10, 64 << 10);
            after = ReadAll(img);
        }
        Qemu.AssertClean(path);
        QemuTools.AssertBytesEqual(before, QemuSnapshotContent(path, "first", dir), "the snapshot keeps what the disk held");
        QemuTools.AssertBytesEqual(after, QemuTools.ReadRaw(path, dir), "the active disk holds our writes");
        var list = Qemu.Img("snapshot", "-l", path).EnsureSuccess().StdOut;
        list.Should().Contain("first");

        using (var img = QcowImage.Open(path))
        {
            img.CreateSnapshot("second").Id.Should().Be("2");
            img.ApplySnapshot("first");
            QemuTools.AssertBytesEqual(before, ReadAll(img), "applied");
            img.Write(0, Pattern(3, 5000));
        }
        Qemu.AssertClean(path);
        QemuTools.AssertBytesEqual(after, QemuSnapshotContent(path, "second", dir), "second snapshot");
        using (var img = QcowImage.Open(path))
        {
            img.DeleteSnapshot("1");
            img.GetSnapshots().Select(s => s.Name).Should().Equal("second");
        }
        Qemu.AssertClean(path);
        using (var img = QcowImage.Open(path))
        {
            img.ApplySnapshot("second");
            img.DeleteSnapshot("second");
            img.GetSnapshots().Should().BeEmpty();
            img.Write(5000, Pattern(4, 3000));
        }
        Qemu.AssertClean(path);
        var final = (byte[])after.Clone();
        Pattern(4, 3000).CopyTo(final, 5000);
        QemuTools.AssertBytesEqual(final, QemuTools.ReadRaw(path, dir), "after deleting every snapshot");
    }
}
