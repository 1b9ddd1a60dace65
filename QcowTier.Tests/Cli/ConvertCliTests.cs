using QcowTier.Tests.Infrastructure;

namespace QcowTier.Tests.Cli;

public sealed class ConvertCliTests
{
    [Fact]
    public void Qcow2_to_raw_and_back_keeps_content_and_passes_check()
    {
        using var dir = new TempDir();
        var src = CliHarness.MixedQcow(dir, "src.qcow2");
        var raw = dir.File("out.raw");
        var back = dir.File("back.qcow2");

        CliHarness.Run("convert", "-O", "raw", src, raw).ExitCode.Should().Be(0);
        Qemu.AssertSameContent(src, raw, "qcow2", "raw");
        CliHarness.Run("convert", "-f", "raw", "-O", "qcow2", raw, back).ExitCode.Should().Be(0);
        Qemu.AssertClean(back);
        Qemu.AssertSameContent(src, back);
        new FileInfo(raw).Length.Should().Be(64 << 20);
    }

    [Fact]
    public void Zero_ranges_and_zero_blocks_stay_unallocated_like_qemu_img()
    {
        using var dir = new TempDir();
        var src = dir.File("src.raw");
        Qemu.Img("create", "-q", "-f", "raw", src, "16M").EnsureSuccess();
        // Data with an all-zero 4k block inside, and zeroes written as data.
        CliHarness.QemuIo(src, "raw", "write -P 1 1M 64k", "write -P 0 1028k 4k", "write -P 0 8M 1M", "write -P 2 12M 4k");
        var ours = dir.File("ours.qcow2");
        var theirs = dir.File("theirs.qcow2");
        CliHarness.Run("convert", "-O", "qcow2", "-o", "cluster_size=4k", src, ours).ExitCode.Should().Be(0);
        Qemu.Img("convert", "-O", "qcow2", "-o", "cluster_size=4k", src, theirs).EnsureSuccess();
        Qemu.AssertClean(ours);
        Qemu.AssertSameContent(ours, src, "qcow2", "raw");
        StripOffsets(Qemu.Img("map", "--output=json", ours).StdOut)
            .Should().Be(StripOffsets(Qemu.Img("map", "--output=json", theirs).StdOut), "the same guest ranges hold data");
    }

    [Fact]
    public void Sparse_size_zero_allocates_everything()
    {
        using var dir = new TempDir();
        var src = dir.File("src.qcow2");
        Qemu.Img("create", "-q", "-f", "qcow2", src, "4M").EnsureSuccess();
        CliHarness.QemuIo(src, "qcow2", "write -P 3 0 64k");
        var dst = dir.File("dst.qcow2");
        CliHarness.Run("convert", "-S", "0", "-O", "qcow2", src, dst).ExitCode.Should().Be(0);
        Qemu.AssertClean(dst);
        Qemu.AssertSameContent(src, dst);
        Qemu.Img("check", "--output=json", dst).StdOut.Should().Contain("\"allocated-clusters\": 64");
    }

    [Theory]
    [InlineData("compat=0.10")]
    [InlineData("cluster_size=2M,lazy_refcounts=on")]
    [InlineData("preallocation=metadata")]
    public void Qcow2_to_qcow2_with_creation_options(string options)
    {
        using var dir = new TempDir();
        var src = CliHarness.MixedQcow(dir, "src.qcow2");
        var dst = dir.File("dst.qcow2");
        var r = CliHarness.Run("convert", "-p", "-O", "qcow2", "-o", options, src, dst);
        r.ExitCode.Should().Be(0, r.StdErr);
        r.StdOut.Should().StartWith("    (0.00/100%)\r").And.EndWith("    (100.00/100%)\r\n");
        Qemu.AssertClean(dst);
        Qemu.AssertSameContent(src, dst);
    }

    [Fact]
    public void Existing_target_with_n_is_overwritten_in_place()
    {
        using var dir = new TempDir();
        var src = CliHarness.MixedQcow(dir, "src.qcow2");
        var dst = dir.File("dst.raw");
        Qemu.Img("create", "-q", "-f", "raw", dst, "64M").EnsureSuccess();
        CliHarness.QemuIo(dst, "raw", "write -P 0x77 0 64M");
        CliHarness.Run("convert", "-n", "-O", "raw", src, dst).ExitCode.Should().Be(0);
        Qemu.AssertSameContent(src, dst, "qcow2", "raw");
    }

    [Theory]
    [InlineData("-S", "1000", "Invalid buffer size for sparse output specified")]
    [InlineData("-O", "foo", "Unknown file format 'foo'")]
    [InlineData("-m", "17", "Invalid number of coroutines")]
    [InlineData("-t", "sometimes", "Invalid cache option: sometimes")]
    [InlineData("-T", "sometimes", "Invalid source cache option: sometimes")]
    [InlineData("-f", "foo", "Unknown driver 'foo'")]
    public void Bad_options_are_refused_as_by_qemu_img(string option, string value, string message)
    {
        using var dir = new TempDir();
        var src = CliHarness.MixedQcow(dir, "src.qcow2");
        var q = Qemu.Img("convert", option, value, src, dir.File("q.out"));
        var r = CliHarness.Run("convert", option, value, src, dir.File("r.out"));
        q.StdErr.Should().Contain(message);
        r.ExitCode.Should().Be(q.ExitCode).And.Be(1);
        r.ShouldBeOneLineError(message);
    }

    [Fact]
    public void Missing_source_is_one_line()
    {
        using var dir = new TempDir();
        var missing = dir.File("nope");
        var r = CliHarness.Run("convert", missing, dir.File("out"));
        r.ExitCode.Should().Be(Qemu.Img("convert", missing, dir.File("out2")).ExitCode);
        r.ShouldBeOneLineError($"Could not open '{missing}': No such file or directory");
    }

    private static string StripOffsets(string json) => System.Text.RegularExpressions.Regex.Replace(json, @", ""offset"": \d+", "");

    [Fact]
    public void Progress_on_a_terminal_is_a_bar_redrawn_in_place()
    {
        using var dir = new TempDir();
        var src = CliHarness.MixedQcow(dir, "src.qcow2");
        using var stdout = new StringWriter();
        using var stderr = new StringWriter();
        var code = QcowTier.Cli.Cli.Run(["convert", "-p", "-O", "raw", src, dir.File("out.raw")],
            new QcowTier.Cli.Infrastructure.CliContext(stdout, stderr, stdoutIsTerminal: true));
        code.Should().Be(0, stderr.ToString());
        var text = stdout.ToString();
        text.Should().StartWith("\r    (0.00/100%) [").And.EndWith("(100.00/100%) [" + new string('#', 30) + "]\n");
        text.Should().NotContain("\n\r");
        Qemu.AssertSameContent(src, dir.File("out.raw"), "qcow2", "raw");
    }
}
