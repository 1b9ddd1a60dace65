using QcowTier.Tests.Infrastructure;

namespace QcowTier.Tests.Cli;

/// <summary>qcowtier snapshot against qemu-img snapshot: same listing, same errors, images QEMU accepts.</summary>
public sealed class SnapshotCliTests
{
    [Fact]
    public void Create_list_apply_delete_match_qemu_img()
    {
        using var dir = new TempDir();
        var path = CliHarness.MixedQcow(dir);
        CliHarness.Run("snapshot", "-c", "first", path).ExitCode.Should().Be(0);
        CliHarness.QemuIo(path, "qcow2", "write -P 8 10M 64k");
        var created = CliHarness.Run("snapshot", "-c", "second snapshot name", path);
        created.ExitCode.Should().Be(0, created.StdErr);
        created.StdOut.Should().BeEmpty();
        Qemu.AssertClean(path);

        var q = Qemu.Img("snapshot", "-l", path).EnsureSuccess();
        var r = CliHarness.Run("snapshot", "-l", path);
        r.ExitCode.Should().Be(0, r.StdErr);
        r.StdOut.Should().Be(q.StdOut);
        foreach (var output in new[] { "human", "json" })
        {
            var qi = Qemu.Img("info", "--output=" + output, path).EnsureSuccess();
            CliHarness.Run("info", "--output=" + output, path).StdOut.Should().Be(qi.StdOut);
        }

        // Apply by name; the disk reads as QEMU reads the snapshot.
        var expected = dir.File("first.raw");
        Qemu.Img("convert", "-l", "snapshot.name=first", "-O", "raw", path, expected).EnsureSuccess();
        CliHarness.Run("snapshot", "-a", "first", path).ExitCode.Should().Be(0);
        Qemu.AssertClean(path);
        Qemu.AssertSameContent(path, expected, "qcow2", "raw");

        // Delete by name; -d does not match ids, as qemu-img.
        var byId = CliHarness.Run("snapshot", "-d", "1", path);
        var qById = Qemu.Img("snapshot", "-d", "1", path);
        byId.ExitCode.Should().Be(qById.ExitCode);
        byId.StdErr.Should().Be(CliHarness.AsOurs(qById.StdErr));
        CliHarness.Run("snapshot", "-d", "first", path).ExitCode.Should().Be(0);
        Qemu.AssertClean(path);
        Qemu.Img("snapshot", "-l", path).EnsureSuccess().StdOut.Should().NotContain("first").And.Contain("second snapshot name");
    }

    [Theory]
    [InlineData("-a", "nosuch")]
    [InlineData("-d", "nosuch")]
    public void Missing_snapshot_errors_match_qemu_img(string flag, string name)
    {
        using var dir = new TempDir();
        var path = CliHarness.MixedQcow(dir);
        var q = Qemu.Img("snapshot", flag, name, path);
        var r = CliHarness.Run("snapshot", flag, name, path);
        r.ExitCode.Should().Be(q.ExitCode);
        r.StdErr.Should().Be(CliHarness.AsOurs(q.StdErr));
    }

    [Fact]
    public void Mixed_actions_and_tiered_images_are_refused()
    {
        using var dir = new TempDir();
        var path = CliHarness.MixedQcow(dir);
        var q = Qemu.Img("snapshot", "-l", "-c", "x", path);
        var r = CliHarness.Run("snapshot", "-l", "-c", "x", path);
        r.ExitCode.Should().Be(1);
        r.StdErr.Should().StartWith(CliHarness.AsOurs(q.StdErr).Split('\n')[0]);

        var tiered = dir.File("t.qcow2");
        CliHarness.Run("create", "-f", "qcow2", "-o", "tier_data_file=t.hdd", tiered, "16M").ExitCode.Should().Be(0);
        var t = CliHarness.Run("snapshot", "-c", "s", tiered);
        t.ExitCode.Should().Be(1);
        t.ShouldBeOneLineError("not supported");
    }
}

/// <summary>qcowtier info shows persistent bitmaps as qemu-img info does.</summary>
public sealed class BitmapInfoCliTests
{
    [Fact]
    public void Info_lists_bitmaps_like_qemu_img()
    {
        using var dir = new TempDir();
        var path = QcowTier.Tests.Bitmaps.BitmapTests.MakeImage(dir);
        foreach (var output in new[] { "human", "json" })
        {
            var q = Qemu.Img("info", "--output=" + output, path).EnsureSuccess();
            var r = CliHarness.Run("info", "--output=" + output, path);
            r.ExitCode.Should().Be(0, r.StdErr);
            r.StdOut.Should().Be(q.StdOut);
        }
    }
}
