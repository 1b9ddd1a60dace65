using System.Text.Json;
using QcowTier.Tests.Infrastructure;
using QcowTier.Tests.Interop.Support;

namespace QcowTier.Tests.Interop;

/// <summary>Virtual sizes and on-disk layout details where QEMU's behaviour is observable.</summary>
public sealed class SizeAndLayoutTests
{
    private static long QemuVirtualSize(string path)
    {
        var r = QemuTools.Img("info", "--output=json", "-f", "qcow2", path).EnsureSuccess();
        using var doc = JsonDocument.Parse(r.StdOut);
        return doc.RootElement.GetProperty("virtual-size").GetInt64();
    }

    /// <summary>qemu-img create rounds the size up to 512 bytes; QEMU only sees whole sectors, so a byte size would hide the tail from it.</summary>
    [Theory]
    [InlineData(1000L)]
    [InlineData(1L)]
    [InlineData((3L << 20) + 7)]
    public void UnalignedCreateSizeIsRoundedUpToASectorAsQemuDoes(long requested)
    {
        using var dir = new TempDir();
        var ours = dir.File("ours.qcow2");
        var theirs = dir.File("qemu.qcow2");
        QemuTools.Img("create", "-q", "-f", "qcow2", theirs, requested.ToString(System.Globalization.CultureInfo.InvariantCulture)).EnsureSuccess();
        var expected = QemuVirtualSize(theirs);
        expected.Should().Be((requested + 511) / 512 * 512);

        using (var img = QcowImage.Create(ours, requested))
        {
            img.Size.Should().Be(expected);
            img.Write(expected - 3, new byte[] { 1, 2, 3 });
        }
        QemuVirtualSize(ours).Should().Be(expected);
        var raw = QemuTools.ReadRaw(ours, dir);
        raw.Length.Should().Be((int)expected);
        raw[^3..].Should().Equal(1, 2, 3);
        QemuTools.AssertClean(ours);
    }

    [Fact]
    public void ResizeToAnUnalignedSizeIsRefusedAsQemuRefusesIt()
    {
        using var dir = new TempDir();
        var path = dir.File("ours.qcow2");
        using (var img = QcowImage.Create(path, 1 << 20))
        {
            var act = () => img.Resize((1 << 20) + 1000);
            act.Should().Throw<ArgumentException>().WithMessage("*512*");
            img.Size.Should().Be(1 << 20);
            img.Resize((1 << 20) + 1024);
            img.Size.Should().Be((1 << 20) + 1024);
        }
        var q = QemuTools.Io("-f", "qcow2", "-c", "truncate 1049700", path); // not a multiple of 512
        (q.StdOut + q.StdErr).Should().Contain("multiple of 512");
        QemuVirtualSize(path).Should().Be((1 << 20) + 1024);
        QemuTools.AssertClean(path);
    }

    /// <summary>preallocation=metadata: our layout is QEMU's (header, refcount table, refcount block, L1, L2 tables, then data).</summary>
    [Theory]
    [InlineData(4096, false)]
    [InlineData(65536, false)]
    [InlineData(512, true)]
    public void PreallocatedMetadataLayoutMatchesQemu(int clusterSize, bool v2)
    {
        using var dir = new TempDir();
        var ours = dir.File("ours.qcow2");
        var theirs = dir.File("qemu.qcow2");
        var f = new ImageFormat(clusterSize, 16, v2, Lazy: false, Prealloc: true);
        const long size = 1 << 20;
        QemuTools.Create(theirs, size, f);
        QcowImage.Create(ours, size, f.Ours()).Dispose();
        QemuTools.AssertClean(ours);
        var mapOurs = QemuTools.Img("map", "--output=json", "-f", "qcow2", ours).EnsureSuccess().StdOut;
        var mapTheirs = QemuTools.Img("map", "--output=json", "-f", "qcow2", theirs).EnsureSuccess().StdOut;
        mapOurs.Should().Be(mapTheirs, "every cluster is allocated where QEMU allocates it");
        new FileInfo(ours).Length.Should().Be(new FileInfo(theirs).Length);
        using var img = QcowImage.Open(ours, new QcowOpenOptions { ReadOnly = true });
        img.GetMap().Should().OnlyContain(e => e.Kind == QcowExtentKind.Data || e.Kind == QcowExtentKind.Zero);
        var buf = new byte[size];
        img.Read(0, buf);
        buf.Should().OnlyContain(b => b == 0);
    }
}
