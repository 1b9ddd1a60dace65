using QcowTier.Tests.Infrastructure;
using static QcowTier.Tests.Backing.BackingKit;

namespace QcowTier.Tests.Backing;

/// <summary>Rebase (safe and unsafe) and commit, compared with qemu-img doing the same on a copy.</summary>
public sealed class RebaseCommitTests
{
    /// <summary>Two folders holding the same relative chain: base (raw or qcow2, 1 MiB) ← top (2 MiB, 4k clusters, partial writes and zeroes).</summary>
    private static (string A, string B) Twins(TempDir dir, string baseFormat)
    {
        var a = dir.File("a");
        Directory.CreateDirectory(a);
        var b = Path.Combine(a, "base." + baseFormat);
        Img("create", "-q", "-f", baseFormat, b, "1M");
        Io(baseFormat, b, "write -P 0x11 0 1M", "write -P 0x12 300k 10k");
        var top = Path.Combine(a, "top.qcow2");
        Img("create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", "-b", "base." + baseFormat, "-F", baseFormat, top, "2M");
        Io("qcow2", top, "write -P 0x21 5000 10000", "write -z 64k 12k", "write -P 0x22 900k 300k", "write -P 0x23 1500k 4k");
        var twin = dir.File("b");
        Directory.CreateDirectory(twin);
        foreach (var f in Directory.GetFiles(a))
        {
            File.Copy(f, Path.Combine(twin, Path.GetFileName(f)));
        }
        return (a, twin);
    }

    [Theory]
    [InlineData("raw", false)]
    [InlineData("qcow2", false)]
    [InlineData("qcow2", true)]
    public void CommitMatchesQemuImgCommit(string baseFormat, bool keep)
    {
        using var dir = new TempDir();
        var (a, b) = Twins(dir, baseFormat);
        var topA = Path.Combine(a, "top.qcow2");
        var topB = Path.Combine(b, "top.qcow2");
        var before = OurContent(topA);
        using (var image = QcowImage.Open(topA))
        {
            image.Commit(keepTop: keep);
            var after = new byte[image.Size];
            image.Read(0, after);
            ShouldEqual(after, before, "(the guest sees the same disk after a commit)");
            if (!keep)
            {
                image.GetMap().Should().OnlyContain(e => e.Kind == QcowExtentKind.Unallocated);
            }
        }
        Qemu.Img(["commit", .. keep ? new[] { "-d" } : [], "-q", topB]).EnsureSuccess();
        Qemu.AssertClean(topA);
        if (baseFormat == "qcow2")
        {
            Qemu.AssertClean(Path.Combine(a, "base.qcow2"));
        }
        var baseA = Path.Combine(a, "base." + baseFormat);
        var baseB = Path.Combine(b, "base." + baseFormat);
        ShouldEqual(QemuContent(dir, baseA), QemuContent(dir, baseB));
        ShouldEqual(QemuContent(dir, topA), QemuContent(dir, topB));
        ShouldEqual(QemuContent(dir, topA), before);
    }

    [Theory]
    [InlineData(false)]
    [InlineData(true)]
    public void RebaseMatchesQemuImgRebase(bool unsafeRebase)
    {
        using var dir = new TempDir();
        var (a, b) = Twins(dir, "qcow2");
        foreach (var d in new[] { a, b })
        {
            var other = Path.Combine(d, "other.raw");
            Img("create", "-q", "-f", "raw", other, "1536K");
            Io("raw", other, "write -P 0x11 0 1M", "write -P 0x44 256k 8k"); // equal to base except 300k..310k and 256k..264k
        }
        var topA = Path.Combine(a, "top.qcow2");
        var topB = Path.Combine(b, "top.qcow2");
        var before = OurContent(topA);
        using (var image = QcowImage.Open(topA))
        {
            image.Rebase("other.raw", "raw", unsafeRebase);
            image.BackingFile.Should().Be("other.raw");
            image.BackingFormat.Should().Be("raw");
            if (!unsafeRebase)
            {
                var after = new byte[image.Size];
                image.Read(0, after);
                ShouldEqual(after, before, "(a safe rebase keeps the guest's view)");
            }
        }
        Qemu.Img(["rebase", .. unsafeRebase ? new[] { "-u" } : [], "-b", "other.raw", "-F", "raw", topB]).EnsureSuccess();
        Qemu.AssertClean(topA);
        Qemu.Img("info", topA).EnsureSuccess().StdOut.Should().Contain("backing file: other.raw (actual path:").And.Contain("backing file format: raw");
        ShouldEqual(QemuContent(dir, topA), QemuContent(dir, topB));
        ShouldEqual(OurContent(topA), QemuContent(dir, topB));
    }

    [Fact]
    public void SafeRebaseOntoNothingFlattens()
    {
        using var dir = new TempDir();
        var (a, _) = Twins(dir, "raw");
        var top = Path.Combine(a, "top.qcow2");
        var before = OurContent(top);
        using (var image = QcowImage.Open(top))
        {
            image.Rebase(null);
            image.BackingFile.Should().BeNull();
            image.GetBackingChain().Should().BeEmpty();
        }
        File.Delete(Path.Combine(a, "base.raw"));
        Qemu.AssertClean(top);
        Qemu.Img("info", top).EnsureSuccess().StdOut.Should().NotContain("backing file");
        ShouldEqual(QemuContent(dir, top), before);
    }

    [Fact]
    public void RebaseOntoItselfIsALoop()
    {
        using var dir = new TempDir();
        var (a, _) = Twins(dir, "raw");
        using var image = QcowImage.Open(Path.Combine(a, "top.qcow2"));
        image.Invoking(i => i.Rebase("top.qcow2", "qcow2")).Should().Throw<QcowBackingFileException>().Which.Reason.Should().Be(QcowBackingError.Loop);
        image.BackingFile.Should().Be("base.raw");
    }
}
