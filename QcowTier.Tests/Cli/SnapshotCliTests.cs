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

    [Fact]
    public void Convert_copies_a_snapshot_as_qemu_img_does()
    {
        using var dir = new TempDir();
        var img = dir.File("s.qcow2");
        Qemu.Img("create", "-q", "-f", "qcow2", img, "4M").EnsureSuccess();
        Qemu.Io("-c", "write -P 0xa 0 1M", img).EnsureSuccess();
        Qemu.Img("snapshot", "-c", "s1", img).EnsureSuccess();
        Qemu.Io("-c", "write -P 0xb 512k 1M", img).EnsureSuccess();
        Qemu.Img("convert", "-l", "s1", "-O", "raw", img, dir.File("theirs.raw")).EnsureSuccess();
        foreach (var param in new[] { "s1", "snapshot.name=s1", "snapshot.id=1", "1" })
        {
            var ours = dir.File($"ours-{param.Replace('=', '-')}.raw");
            CliHarness.Run("convert", "-l", param, "-O", "raw", img, ours).ExitCode.Should().Be(0);
            File.ReadAllBytes(ours).Should().Equal(File.ReadAllBytes(dir.File("theirs.raw")), $"-l {param} copies the snapshot, not the active disk");
        }
        CliHarness.Run("convert", "-l", "s1", "-O", "qcow2", img, dir.File("ours.qcow2")).ExitCode.Should().Be(0);
        Qemu.AssertClean(dir.File("ours.qcow2"));
        Qemu.AssertSameContent(dir.File("ours.qcow2"), dir.File("theirs.raw"), "qcow2", "raw");
        var missing = CliHarness.Run("convert", "-l", "nope", "-O", "raw", img, dir.File("x.raw"));
        missing.ExitCode.Should().Be(1);
        missing.StdErr.Should().Contain("Failed to load snapshot: Can't find snapshot");
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
