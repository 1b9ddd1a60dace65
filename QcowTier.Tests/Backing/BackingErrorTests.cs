using System.Text;
using QcowTier.Tests.Infrastructure;
using static QcowTier.Tests.Backing.BackingKit;

namespace QcowTier.Tests.Backing;

/// <summary>Hostile or broken chains: typed errors naming the files, and nothing opened that the policy forbids.</summary>
public sealed class BackingErrorTests
{
    private static readonly QcowOpenOptions ReadOnly = new() { ReadOnly = true };

    private static QcowBackingFileException Refused(string path, QcowBackingError reason, QcowOpenOptions? options = null)
    {
        var act = () => QcowImage.Open(path, options ?? ReadOnly).Dispose();
        var e = act.Should().Throw<QcowBackingFileException>().Which;
        e.Reason.Should().Be(reason, e.Message);
        return e;
    }

    private static void Overlay(string path, string backing, string fmt = "qcow2", string size = "1M")
        => Img("create", "-q", "-f", "qcow2", "-u", "-b", backing, "-F", fmt, path, size);

    [Fact]
    public void MissingBackingFileIsNotFoundButIgnorePolicyOpens()
    {
        using var dir = new TempDir();
        var top = dir.File("top.qcow2");
        Overlay(top, "gone.qcow2");
        var e = Refused(top, QcowBackingError.NotFound);
        e.Message.Should().Contain($"Could not open '{dir.File("gone.qcow2")}': No such file or directory");
        e.BackingFileName.Should().Be("gone.qcow2");
        using var image = QcowImage.Open(top, new QcowOpenOptions { ReadOnly = true, BackingPolicy = QcowBackingPolicy.Ignore });
        image.BackingFile.Should().Be("gone.qcow2");
        image.GetBackingChain().Should().BeEmpty();
        var buffer = new byte[4096];
        buffer[0] = 1;
        image.Read(0, buffer);
        buffer.Should().OnlyContain(b => b == 0);
    }

    [Fact]
    public void IgnoredBackingFileRefusesCopyOnWrite()
    {
        using var dir = new TempDir();
        var top = dir.File("top.qcow2");
        Overlay(top, "gone.qcow2");
        using var image = QcowImage.Open(top, new QcowOpenOptions { BackingPolicy = QcowBackingPolicy.Ignore });
        image.Invoking(i => i.Write(100, new byte[10])).Should().Throw<InvalidOperationException>().WithMessage("*backing file was not opened*");
        image.Write(0, new byte[65536]); // a whole cluster needs nothing from the backing file
    }

    [Fact]
    public void LoopsAreFoundByIdentityNotName()
    {
        using var dir = new TempDir();
        var self = dir.File("self.qcow2");
        Overlay(self, "self.qcow2");
        Refused(self, QcowBackingError.Loop);
        Refused(self, QcowBackingError.Loop, new QcowOpenOptions()); // writable too

        var a = dir.File("a.qcow2");
        var b = dir.File("b.qcow2");
        Overlay(a, "b.qcow2");
        Overlay(b, "./sub/../a.qcow2");
        Directory.CreateDirectory(dir.File("sub"));
        Refused(a, QcowBackingError.Loop);

        // A hard link has another name but the same inode.
        var c = dir.File("c.qcow2");
        var link = dir.File("c-link.qcow2");
        Overlay(c, "c-link.qcow2");
        Qemu.Run("ln", [c, link]).EnsureSuccess();
        Refused(c, QcowBackingError.Loop);
    }

    [Fact]
    public void ChainsDeeperThanTheLimitAreRefused()
    {
        using var dir = new TempDir();
        var template = dir.File("template.qcow2");
        Overlay(template, "l0000.qcow2", size: "64k");
        var bytes = File.ReadAllBytes(template);
        var at = bytes.AsSpan().IndexOf("l0000.qcow2"u8);
        Img("create", "-q", "-f", "qcow2", dir.File("l0000.qcow2"), "64k");
        for (var i = 1; i <= QcowImage.MaxBackingDepth + 1; i++)
        {
            Encoding.ASCII.GetBytes($"l{i - 1:0000}.qcow2").CopyTo(bytes, at);
            File.WriteAllBytes(dir.File($"l{i:0000}.qcow2"), bytes);
        }
        using (var deepest = QcowImage.Open(dir.File($"l{QcowImage.MaxBackingDepth:0000}.qcow2"), ReadOnly))
        {
            deepest.GetBackingChain().Should().HaveCount(QcowImage.MaxBackingDepth);
        }
        Refused(dir.File($"l{QcowImage.MaxBackingDepth + 1:0000}.qcow2"), QcowBackingError.TooDeep);
    }

    [Fact]
    public void PolicyKeepsBackingFilesInsideTheRoot()
    {
        using var dir = new TempDir();
        Directory.CreateDirectory(dir.File("vm"));
        Img("create", "-q", "-f", "raw", dir.File("outside.raw"), "1M");
        Img("create", "-q", "-f", "raw", dir.File("vm/inside.raw"), "1M");
        var escape = dir.File("vm/escape.qcow2");
        Overlay(escape, "../outside.raw", "raw");
        var absolute = dir.File("vm/absolute.qcow2");
        Overlay(absolute, dir.File("outside.raw"), "raw");
        var viaLink = dir.File("vm/link.qcow2");
        File.CreateSymbolicLink(dir.File("vm/innocent.raw"), dir.File("outside.raw"));
        Overlay(viaLink, "innocent.raw", "raw");
        var fine = dir.File("vm/fine.qcow2");
        Overlay(fine, "inside.raw", "raw");
        var within = new QcowOpenOptions { ReadOnly = true, BackingPolicy = QcowBackingPolicy.WithinRoot };
        Refused(escape, QcowBackingError.Refused, within).Message.Should().Contain("outside the allowed folder");
        Refused(absolute, QcowBackingError.Refused, within);
        Refused(viaLink, QcowBackingError.Refused, within);
        QcowImage.Open(fine, within).Dispose();
        QcowImage.Open(escape, new QcowOpenOptions { ReadOnly = true, BackingPolicy = QcowBackingPolicy.WithinRoot, BackingRoot = dir.Path }).Dispose();
        QcowImage.Open(escape, ReadOnly).Dispose(); // Follow (QEMU's behaviour) is the default
        Refused(fine, QcowBackingError.Refused, new QcowOpenOptions { ReadOnly = true, BackingPolicy = QcowBackingPolicy.Refuse });
    }

    [Theory]
    [InlineData("nbd://localhost:10809/export")]
    [InlineData("json:{\"driver\": \"raw\", \"file\": {\"driver\": \"file\", \"filename\": \"/etc/passwd\"}}")]
    [InlineData("http://example.com/disk.img")]
    public void ProtocolNamesAreRefused(string name)
    {
        using var dir = new TempDir();
        var top = dir.File("top.qcow2");
        Overlay(top, name, "raw");
        Refused(top, QcowBackingError.Protocol).Message.Should().Contain("protocol");
        var create = () => QcowImage.Create(dir.File("new.qcow2"), 1 << 20, new QcowCreateOptions { BackingFile = name }).Dispose();
        create.Should().Throw<ArgumentException>();
    }

    [Fact]
    public void FormatMismatchesAreRefused()
    {
        using var dir = new TempDir();
        Img("create", "-q", "-f", "raw", dir.File("base.raw"), "1M");
        var claimsQcow = dir.File("claims-qcow.qcow2");
        Overlay(claimsQcow, "base.raw", "qcow2");
        Refused(claimsQcow, QcowBackingError.Format).Message.Should().Contain("not in qcow2 format");
        var vmdk = dir.File("vmdk.qcow2");
        Overlay(vmdk, "base.raw", "vmdk");
        Refused(vmdk, QcowBackingError.Format);
    }

    [Fact]
    public void TieredImagesWithBackingFilesAreRefused()
    {
        using var dir = new TempDir();
        Img("create", "-q", "-f", "raw", dir.File("base.raw"), "1M");
        var create = () => QcowImage.Create(dir.File("t.qcow2"), 1 << 20, new QcowCreateOptions
        {
            BackingFile = "base.raw",
            BackingFormat = "raw",
            Tier = new QcowTierOptions { DataFile = "t.hdd" },
        }).Dispose();
        create.Should().Throw<ArgumentException>().WithMessage("*Tiered images with a backing file*");
        using var image = QcowImage.Create(dir.File("o.qcow2"), 1 << 20, new QcowCreateOptions { BackingFile = "base.raw", BackingFormat = "raw" });
        image.Invoking(i => i.AttachTier(new QcowTierOptions { DataFile = "o.hdd" })).Should().Throw<QcowUnsupportedFeatureException>();
    }

    [Fact]
    public void ATieredImageCanBeTheBackingFileOfAPlainOverlay()
    {
        using var dir = new TempDir();
        var tiered = dir.File("tiered.qcow2");
        var data = Enumerable.Range(0, 200_000).Select(i => (byte)(i % 253)).ToArray();
        using (var t = QcowImage.Create(tiered, 1 << 20, new QcowCreateOptions { Tier = new QcowTierOptions { DataFile = "tiered.hdd", DefaultTier = StorageTier.Hdd } }))
        {
            t.Write(0, data);
        }
        var overlay = dir.File("overlay.qcow2");
        using (var o = QcowImage.Create(overlay, 1 << 20, new QcowCreateOptions { BackingFile = "tiered.qcow2", BackingFormat = "qcow2" }))
        {
            o.Write(100, new byte[] { 1, 2, 3 });
        }
        var expected = new byte[1 << 20];
        data.CopyTo(expected, 0);
        new byte[] { 1, 2, 3 }.CopyTo(expected, 100);
        ShouldEqual(OurContent(overlay), expected);
    }
}
