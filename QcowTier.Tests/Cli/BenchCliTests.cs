using System.Text.RegularExpressions;
using QcowTier.Tests.Infrastructure;

namespace QcowTier.Tests.Cli;

public sealed partial class BenchCliTests
{
    [GeneratedRegex(@"^Run completed in [0-9]+\.[0-9]{3} seconds\.$")]
    private static partial Regex Completed();

    private static void AssertSameBench(string path, params string[] options)
    {
        var q = Qemu.Img(["bench", .. options, path]).EnsureSuccess();
        var r = CliHarness.Run(["bench", .. options, path]);
        r.ExitCode.Should().Be(0, r.StdErr);
        var ours = r.StdOut.TrimEnd('\n').Split('\n');
        var theirs = q.StdOut.TrimEnd('\n').Split('\n');
        ours[..^1].Should().Equal(theirs[..^1]);
        ours[^1].Should().MatchRegex(Completed().ToString());
    }

    [Theory]
    [InlineData()]
    [InlineData("-c", "2000", "-d", "8", "-s", "64k", "-S", "128k", "-o", "1M")]
    [InlineData("-c", "500", "-d", "1", "-t", "none")]
    [InlineData("-c", "0")]
    [InlineData("-c", "300", "-s", "1M", "-S", "3M")]
    public void Read_bench_prints_qemu_img_lines(params string[] options)
    {
        using var dir = new TempDir();
        AssertSameBench(CliHarness.MixedQcow(dir), options.Length == 0 ? ["-c", "3000"] : options);
    }

    [Fact]
    public void Write_bench_writes_the_pattern_and_leaves_a_clean_image()
    {
        using var dir = new TempDir();
        var path = dir.File("w.qcow2");
        Qemu.Img("create", "-q", "-f", "qcow2", path, "64M").EnsureSuccess();
        AssertSameBench(path, "-w", "-c", "4000", "--pattern=0x42", "-d", "16", "--flush-interval=100");
        Qemu.AssertClean(path);
        CliHarness.QemuIo(path, "qcow2", "read -P 0x42 0 16000k");
        AssertSameBench(path, "-w", "-c", "1000", "--pattern=7", "-d", "4", "-o", "32M", "--flush-interval=16", "--no-drain");
        Qemu.AssertClean(path);
        CliHarness.QemuIo(path, "qcow2", "read -P 7 32M 4000k", "read -P 0x42 0 16000k");
    }

    [Fact]
    public void Raw_write_bench_wraps_around_the_end_like_qemu_img()
    {
        using var dir = new TempDir();
        var ours = dir.File("ours.raw");
        var theirs = dir.File("theirs.raw");
        Qemu.Img("create", "-q", "-f", "raw", ours, "1M").EnsureSuccess();
        Qemu.Img("create", "-q", "-f", "raw", theirs, "1M").EnsureSuccess();
        string[] opts = ["-f", "raw", "-w", "-c", "1000", "-s", "4096", "-S", "8192", "-d", "1", "--pattern=9"];
        Qemu.Img(["bench", .. opts, theirs]).EnsureSuccess();
        CliHarness.Run(["bench", .. opts, ours]).ExitCode.Should().Be(0);
        Qemu.AssertSameContent(ours, theirs, "raw", "raw");
    }

    [Theory]
    [InlineData("--flush-interval=10")]
    [InlineData("-w", "--flush-interval=10")]
    [InlineData("-c", "abc")]
    [InlineData("-s", "3G")]
    [InlineData("-t", "foo")]
    [InlineData("--pattern=300")]
    public void Option_errors_match_qemu_img(params string[] options)
    {
        using var dir = new TempDir();
        var path = CliHarness.MixedQcow(dir);
        var q = Qemu.Img(["bench", .. options, path]);
        var r = CliHarness.Run(["bench", .. options, path]);
        r.ExitCode.Should().Be(q.ExitCode).And.Be(1);
        r.ShouldBeOneLineError();
        r.StdErr.Should().StartWith(CliHarness.AsOurs(q.StdErr.Split('\n')[0]));
    }

    [Theory]
    [InlineData("-c", "10", "-o", "1G")]
    [InlineData("-c", "3", "-S", "67107864", "-d", "1")]
    public void Requests_past_the_end_fail(params string[] options)
    {
        using var dir = new TempDir();
        var path = CliHarness.MixedQcow(dir);
        var q = Qemu.Img(["bench", .. options, path]);
        var r = CliHarness.Run(["bench", .. options, path]);
        r.ExitCode.Should().Be(q.ExitCode).And.Be(1);
        r.StdOut.Should().Be(q.StdOut);
        r.ShouldBeOneLineError("Failed request: Input/output error");
    }
}
