using QcowTier.Tests.Infrastructure;

namespace QcowTier.Tests.Cli;

public sealed class ResizeCliTests
{
    [Theory]
    [InlineData("qcow2", "+1M")]
    [InlineData("qcow2", "100M")]
    [InlineData("qcow2", "64M")]
    [InlineData("qcow2", "+3G")]
    [InlineData("raw", "+513")]
    [InlineData("raw", "70M")]
    public void Growing_matches_qemu_img(string format, string size)
    {
        using var dir = new TempDir();
        var ours = dir.File("ours");
        var theirs = dir.File("theirs");
        foreach (var p in new[] { ours, theirs })
        {
            Qemu.Img("create", "-q", "-f", format, p, "64M").EnsureSuccess();
            CliHarness.QemuIo(p, format, "write -P 5 63M 1M");
        }
        var q = Qemu.Img("resize", "-f", format, theirs, size).EnsureSuccess();
        var r = CliHarness.Run("resize", "-f", format, ours, size);
        r.ExitCode.Should().Be(0, r.StdErr);
        r.StdOut.Should().Be(q.StdOut).And.Be("Image resized.\n");
        CreateCliTests.Field(Qemu.Img("info", "--output=json", ours).StdOut, "virtual-size")
            .Should().Be(CreateCliTests.Field(Qemu.Img("info", "--output=json", theirs).StdOut, "virtual-size"));
        Qemu.AssertSameContent(ours, theirs, format, format);
        if (format == "qcow2")
        {
            Qemu.AssertClean(ours);
        }
    }

    [Fact]
    public void Shrinking_needs_the_option_then_matches_qemu_img()
    {
        using var dir = new TempDir();
        var path = dir.File("a.qcow2");
        var theirs = dir.File("b.qcow2");
        foreach (var p in new[] { path, theirs })
        {
            Qemu.Img("create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", p, "64M").EnsureSuccess();
            Qemu.Io("-f", "qcow2", "-c", "write -P 0x5a 0 40M", p).EnsureSuccess();
        }
        var r = CliHarness.Run("resize", path, "-1M");
        r.ExitCode.Should().Be(Qemu.Img("resize", path, "-1M").ExitCode).And.Be(1);
        r.ShouldBeOneLineError("Use the --shrink option to perform a shrink operation.");
        CliHarness.Run("resize", "--shrink", "--preallocation=full", path, "32M").ShouldBeOneLineError("Preallocation can only be used for growing images");
        CliHarness.Run("resize", "--shrink", path, "5M").ExitCode.Should().Be(0);
        Qemu.Img("resize", "-q", "--shrink", theirs, "5M").EnsureSuccess();
        CreateCliTests.Field(Qemu.Img("info", "--output=json", path).StdOut, "virtual-size").Should().Be("5242880");
        Qemu.AssertClean(path);
        Qemu.AssertSameContent(path, theirs);
        new FileInfo(path).Length.Should().Be(new FileInfo(theirs).Length, "the free tail is given back as qemu-img does");
    }

    [Theory]
    [InlineData("metadata")]
    [InlineData("falloc")]
    [InlineData("full")]
    public void Growing_with_preallocation_matches_qemu_img(string mode)
    {
        using var dir = new TempDir();
        var ours = dir.File("a.qcow2");
        var theirs = dir.File("b.qcow2");
        foreach (var p in new[] { ours, theirs })
        {
            Qemu.Img("create", "-q", "-f", "qcow2", "-o", "cluster_size=65536", p, "3M").EnsureSuccess();
            Qemu.Io("-f", "qcow2", "-c", "write -P 0x11 1000 70000", p).EnsureSuccess();
        }
        CliHarness.Run("resize", "--preallocation=" + mode, ours, "+5M").ExitCode.Should().Be(0);
        Qemu.Img("resize", "-q", "--preallocation=" + mode, theirs, "+5M").EnsureSuccess();
        Qemu.AssertClean(ours);
        Qemu.AssertSameContent(ours, theirs);
        var mapOurs = Qemu.Img("map", "--output=json", ours).EnsureSuccess().StdOut;
        var mapTheirs = Qemu.Img("map", "--output=json", theirs).EnsureSuccess().StdOut;
        // Same extents and kinds; QEMU places the contiguous data run a cluster further on in some layouts.
        static string Shape(string map) => System.Text.RegularExpressions.Regex.Replace(map, @", ""offset"": \d+", "");
        Shape(mapOurs).Should().Be(Shape(mapTheirs));
    }

    [Fact]
    public void Raw_files_shrink_with_the_option_as_with_qemu_img()
    {
        using var dir = new TempDir();
        var ours = dir.File("ours.raw");
        var theirs = dir.File("theirs.raw");
        Qemu.Img("create", "-q", "-f", "raw", ours, "8M").EnsureSuccess();
        Qemu.Img("create", "-q", "-f", "raw", theirs, "8M").EnsureSuccess();
        Qemu.Img("resize", "-f", "raw", "--shrink", theirs, "-1M").EnsureSuccess();
        CliHarness.Run("resize", "-f", "raw", "--shrink", ours, "-1M").ExitCode.Should().Be(0);
        new FileInfo(ours).Length.Should().Be(new FileInfo(theirs).Length);
    }

    [Theory]
    [InlineData("1x")]
    [InlineData("+100.5")]
    public void Bad_sizes_are_refused(string size)
    {
        using var dir = new TempDir();
        var path = dir.File("a.qcow2");
        Qemu.Img("create", "-q", "-f", "qcow2", path, "64M").EnsureSuccess();
        var q = Qemu.Img("resize", path, size);
        var r = CliHarness.Run("resize", path, size);
        r.ExitCode.Should().Be(q.ExitCode).And.Be(1);
        r.ShouldBeOneLineError("Parameter 'size' expects a non-negative number below 2^64");
    }

    [Fact]
    public void Qcow2_sizes_must_be_sector_multiples()
    {
        using var dir = new TempDir();
        var path = dir.File("a.qcow2");
        Qemu.Img("create", "-q", "-f", "qcow2", path, "1M").EnsureSuccess();
        var q = Qemu.Img("resize", path, "+100");
        var r = CliHarness.Run("resize", path, "+100");
        r.ExitCode.Should().Be(q.ExitCode).And.Be(1);
        r.ShouldBeOneLineError("The new size must be a multiple of 512");
    }
}
