using QcowTier.Tests.Infrastructure;

namespace QcowTier.Tests.Cli;

public sealed class CheckCliTests
{
    [Theory]
    [InlineData("human")]
    [InlineData("json")]
    public void Clean_image_reports_as_qemu_img(string output)
    {
        using var dir = new TempDir();
        var path = CliHarness.MixedQcow(dir);
        var q = Qemu.Img("check", "--output=" + output, path);
        var r = CliHarness.Run("check", "--output=" + output, path);
        r.ExitCode.Should().Be(q.ExitCode).And.Be(0);
        r.StdOut.Should().Be(q.StdOut);
        r.StdErr.Should().BeEmpty();
    }

    [Theory]
    [InlineData("human")]
    [InlineData("json")]
    public void Leaks_give_exit_3_and_the_same_report(string output)
    {
        using var dir = new TempDir();
        var path = LeakyImage(dir);
        var q = Qemu.Img("check", "--output=" + output, path);
        var r = CliHarness.Run("check", "--output=" + output, path);
        q.ExitCode.Should().Be(3);
        r.ExitCode.Should().Be(3);
        r.StdOut.Should().Be(q.StdOut);
        r.StdErr.Should().Be(q.StdErr);
    }

    [Theory]
    [InlineData("leaks")]
    [InlineData("all")]
    public void Repairing_leaks_prints_qemu_img_summary_and_leaves_a_clean_image(string mode)
    {
        using var dir = new TempDir();
        var ours = LeakyImage(dir, "ours.qcow2");
        var theirs = dir.File("theirs.qcow2");
        File.Copy(ours, theirs);
        var q = Qemu.Img("check", "-r", mode, theirs);
        var r = CliHarness.Run("check", "-r", mode, ours);
        r.ExitCode.Should().Be(q.ExitCode).And.Be(0);
        r.StdOut.Should().Be(q.StdOut);
        Qemu.AssertClean(ours);
        Qemu.AssertSameContent(ours, theirs);
    }

    [Fact]
    public void Corruption_gives_exit_2()
    {
        using var dir = new TempDir();
        var path = CliHarness.MixedQcow(dir);
        ImageSurgery.SetRefcount(path, ImageSurgery.FirstDataCluster(path), 0);
        var q = Qemu.Img("check", path);
        var r = CliHarness.Run("check", path);
        q.ExitCode.Should().Be(2);
        r.ExitCode.Should().Be(2);
        r.StdOut.Should().Be(q.StdOut);
        var qj = Qemu.Img("check", "--output=json", path);
        CliHarness.Run("check", "--output=json", path).StdOut.Should().Be(qj.StdOut);
    }

    [Fact]
    public void Raw_images_have_no_check_exit_63()
    {
        using var dir = new TempDir();
        var path = dir.File("a.raw");
        Qemu.Img("create", "-q", "-f", "raw", path, "1M").EnsureSuccess();
        var q = Qemu.Img("check", path);
        var r = CliHarness.Run("check", path);
        r.ExitCode.Should().Be(q.ExitCode).And.Be(63);
        r.ShouldBeOneLineError("This image format does not support checks");
    }

    [Fact]
    public void Bad_repair_mode_is_refused()
    {
        using var dir = new TempDir();
        var path = CliHarness.MixedQcow(dir);
        var q = Qemu.Img("check", "-r", "some", path);
        var r = CliHarness.Run("check", "-r", "some", path);
        r.ExitCode.Should().Be(q.ExitCode).And.Be(1);
        r.ShouldBeOneLineError();
        r.StdErr.Trim().Should().Be(CliHarness.AsOurs(q.StdErr.Split('\n')[0]));
    }

    private static string LeakyImage(TempDir dir, string name = "leaky.qcow2")
    {
        var path = dir.File(name);
        Qemu.Img("create", "-q", "-f", "qcow2", path, "64M").EnsureSuccess();
        CliHarness.QemuIo(path, "qcow2", "write -P 1 0 256k");
        ImageSurgery.ClearL2Entries(path, 1, 2);
        return path;
    }
}
