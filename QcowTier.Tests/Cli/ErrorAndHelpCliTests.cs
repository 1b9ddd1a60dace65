using QcowTier.Tests.Infrastructure;

namespace QcowTier.Tests.Cli;

public sealed class ErrorAndHelpCliTests
{
    public static TheoryData<string> Verbs => ["bench", "check", "compare", "convert", "create", "info", "io", "map", "resize"];

    [Theory]
    [MemberData(nameof(Verbs))]
    public void Every_verb_has_help(string verb)
    {
        var r = CliHarness.Run(verb, "--help");
        r.ExitCode.Should().Be(0);
        r.StdOut.Should().StartWith($"usage: qcowtier {verb} ");
        r.StdErr.Should().BeEmpty();
        CliHarness.Run(verb, "-h").StdOut.Should().Be(r.StdOut);
    }

    [Fact]
    public void Tool_help_lists_every_verb()
    {
        var r = CliHarness.Run("--help");
        r.ExitCode.Should().Be(0);
        foreach (var verb in Verbs)
        {
            r.StdOut.Should().Contain($"\n  {verb} ");
        }
    }

    [Fact]
    public void No_arguments_and_unknown_verbs_are_one_line_errors()
    {
        CliHarness.Run().ShouldBeOneLineError();
        CliHarness.Run("frobnicate").ShouldBeOneLineError("Command not found: frobnicate");
        CliHarness.Run("info", "--bogus", "x").ShouldBeOneLineError("unrecognized option '--bogus'");
        CliHarness.Run("info", "-f").ShouldBeOneLineError("missing argument for option '-f'");
    }

    [Theory]
    [InlineData("info")]
    [InlineData("check")]
    [InlineData("map")]
    public void Missing_file_is_one_line_with_exit_1(string verb)
    {
        using var dir = new TempDir();
        var missing = dir.File("missing.qcow2");
        var q = Qemu.Img(verb, missing);
        var r = CliHarness.Run(verb, missing);
        r.ExitCode.Should().Be(q.ExitCode).And.Be(1);
        r.ShouldBeOneLineError($"Could not open '{missing}': No such file or directory");
    }

    [Theory]
    [InlineData("info")]
    [InlineData("map")]
    [InlineData("check")]
    public void Unsupported_feature_is_one_line_with_exit_1(string verb)
    {
        using var dir = new TempDir();
        var path = dir.File("future.qcow2");
        Qemu.Img("create", "-q", "-f", "qcow2", path, "1M").EnsureSuccess();
        ImageSurgery.SetIncompatibleBit(path, 40);
        var q = Qemu.Img(verb, path);
        var r = CliHarness.Run(verb, path);
        q.ExitCode.Should().Be(1);
        r.ExitCode.Should().Be(1);
        r.ShouldBeOneLineError($"Could not open '{path}'");
    }

    [Fact]
    public void Damaged_header_is_one_line_with_exit_1()
    {
        using var dir = new TempDir();
        var path = dir.File("damaged.qcow2");
        Qemu.Img("create", "-q", "-f", "qcow2", path, "1M").EnsureSuccess();
        // cluster_bits = 40: no valid image has that.
        ImageSurgery.Overwrite(path, 20, 0, 0, 0, 40);
        Qemu.Img("info", path).ExitCode.Should().Be(1);
        CliHarness.Run("info", path).ShouldBeOneLineError($"Could not open '{path}'");
        CliHarness.Run("convert", path, dir.File("out.raw")).ShouldBeOneLineError($"Could not open '{path}'");
    }

    [Fact]
    public void Corrupt_l2_table_pointer_is_reported_not_thrown()
    {
        using var dir = new TempDir();
        var path = dir.File("badl1.qcow2");
        Qemu.Img("create", "-q", "-f", "qcow2", path, "64M").EnsureSuccess();
        CliHarness.QemuIo(path, "qcow2", "write -P 1 0 64k");
        // Point L1 entry 0 far beyond the end of the file.
        var l1 = ImageSurgery.L1Offset(path);
        ImageSurgery.Overwrite(path, l1, 0x80, 0, 0, 0x10, 0, 0, 0, 0);
        var r = CliHarness.Run("convert", "-O", "raw", path, dir.File("out.raw"));
        r.ExitCode.Should().Be(1);
        r.ShouldBeOneLineError();
        var m = CliHarness.Run("map", path);
        m.ExitCode.Should().Be(1);
        m.ShouldBeOneLineError();
    }
}
