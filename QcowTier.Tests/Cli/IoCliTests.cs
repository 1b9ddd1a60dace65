using System.Text.RegularExpressions;
using QcowTier.Tests.Infrastructure;

namespace QcowTier.Tests.Cli;

public sealed partial class IoCliTests
{
    /// <summary>The stats lines carry timings; everything else must be byte-for-byte qemu-io's.</summary>
    private static string WithoutTimings(string stdout)
        => string.Join('\n', stdout.Split('\n').Where(l => !StatsLine().IsMatch(l) && !CsvStatsLine().IsMatch(l)));

    [GeneratedRegex(@"^[0-9.]+ (bytes|KiB|MiB|GiB), 1 ops; ([0-9]+:)?[0-9:.]+( sec)? \([0-9.]+ (bytes|KiB|MiB|GiB)/sec and [0-9.]+ ops/sec\)$")]
    private static partial Regex StatsLine();

    [GeneratedRegex(@"^[0-9]+,1,[0-9]+:[0-9]{2}:[0-9]{2}\.[0-9]{2},[0-9.]+,[0-9.]+$")]
    private static partial Regex CsvStatsLine();

    [Fact]
    public void Command_sequence_prints_what_qemu_io_prints()
    {
        using var dir = new TempDir();
        var ours = dir.File("ours.qcow2");
        var theirs = dir.File("theirs.qcow2");
        Qemu.Img("create", "-q", "-f", "qcow2", ours, "64M").EnsureSuccess();
        File.Copy(ours, theirs);
        string[] commands =
        [
            "write -P 0xab 0 4k", "read -P 0xab 0 4k", "read -P 0xac 0 4k", "read -P 0xab 512 4k",
            "write -z 1M 1M", "write -z -u 2M 64k", "discard 0 64k", "flush", "read -v 0 40",
            "write 1k 1", "read 0 1G", "read 0 1x", "write -P 0x1ff 0 1", "write 64M 1", "d 0 64k",
            "read 0 0", "w 0 512", "read 1b 2", "read 0 1.5k", "f", "length", "write -P 1 0 513",
            "read -P 2 1 2", "read -P 1 -v 1 20", "read -P 1 -l 100 -s 2 0 200", "read -C 0 1",
            "write -u 0 1", "read -l 5 0 10", "read -P 1 -s 20 0 10", "write -q -P 3 8k 4k", "read -q -P 4 8k 4k",
        ];
        var q = Qemu.Io([.. commands.SelectMany(c => new[] { "-c", c }), theirs]);
        var r = CliHarness.Run(["io", .. commands.SelectMany(c => new[] { "-c", c }), ours]);

        r.ExitCode.Should().Be(q.ExitCode).And.Be(1);
        WithoutTimings(r.StdOut).Should().Be(WithoutTimings(q.StdOut));
        r.StdOut.Split('\n').Count(l => StatsLine().IsMatch(l)).Should().Be(q.StdOut.Split('\n').Count(l => StatsLine().IsMatch(l)));
        Qemu.AssertSameContent(ours, theirs);
        Qemu.AssertClean(ours);
    }

    [Theory]
    [InlineData("qcow2")]
    [InlineData("raw")]
    public void Our_writes_verify_with_qemu_io_and_theirs_with_ours(string format)
    {
        using var dir = new TempDir();
        var path = dir.File("disk");
        Qemu.Img("create", "-q", "-f", format, path, "16M").EnsureSuccess();
        CliHarness.Run("io", "-f", format, "-c", "write -P 0x5a 1M 192k", "-c", "write -z 1088k 4k", "-c", "write 8M 1000", path)
            .ExitCode.Should().Be(0);
        CliHarness.QemuIo(path, format, "read -P 0x5a 1M 64k", "read -P 0 1088k 4k", "read -P 0x5a 1092k 100k", "read -P 0xcd 8M 1000");
        CliHarness.QemuIo(path, format, "write -P 0x33 4M 12345", "write -z -u 6M 1M");
        var r = CliHarness.Run("io", "-r", "-c", "read -P 0x33 4M 12345", "-c", "read -P 0 6M 1M", path);
        r.ExitCode.Should().Be(0, r.StdOut);
        r.StdOut.Should().NotContain("Pattern verification failed");
    }

    [Fact]
    public void Pattern_mismatch_fails_with_qemu_io_line()
    {
        using var dir = new TempDir();
        var path = dir.File("a.qcow2");
        Qemu.Img("create", "-q", "-f", "qcow2", path, "1M").EnsureSuccess();
        CliHarness.QemuIo(path, "qcow2", "write -P 1 0 64k");
        var r = CliHarness.Run("io", "-c", "read -P 2 4k 8k", path);
        r.ExitCode.Should().Be(1);
        r.StdOut.Should().StartWith("Pattern verification failed at offset 4096, 8192 bytes\nread 8192/8192 bytes at offset 4096\n");
    }

    [Fact]
    public void Writes_on_a_read_only_open_fail()
    {
        using var dir = new TempDir();
        var path = dir.File("a.qcow2");
        Qemu.Img("create", "-q", "-f", "qcow2", path, "1M").EnsureSuccess();
        var r = CliHarness.Run("io", "-r", "-c", "write 0 4k", path);
        r.ExitCode.Should().Be(Qemu.Io("-r", "-c", "write 0 4k", path).ExitCode).And.Be(1);
        r.ShouldBeOneLineError("Block node is read-only");
        r.StdOut.Should().BeEmpty();
    }

    [Fact]
    public void Unknown_commands_and_bad_arguments_fail_like_qemu_io()
    {
        using var dir = new TempDir();
        var path = dir.File("a.qcow2");
        Qemu.Img("create", "-q", "-f", "qcow2", path, "1M").EnsureSuccess();
        foreach (var c in new[] { "foo", "read", "read -Q 0 1", "write -z -P 1 0 1" })
        {
            var q = Qemu.Io("-c", c, path);
            var r = CliHarness.Run("io", "-c", c, path);
            r.ExitCode.Should().Be(q.ExitCode).And.Be(1, c);
            r.StdOut.Should().Be(q.StdOut, c);
            r.StdErr.Should().Be(q.StdErr.Length == 0 ? "" : "qcowtier: " + q.StdErr, c);
        }
    }

    [Fact]
    public void Missing_image_is_one_line()
    {
        using var dir = new TempDir();
        var missing = dir.File("nope.qcow2");
        var r = CliHarness.Run("io", "-c", "read 0 1", missing);
        r.ExitCode.Should().Be(Qemu.Io("-c", "read 0 1", missing).ExitCode).And.Be(1);
        r.ShouldBeOneLineError($"can't open device {missing}: Could not open '{missing}': No such file or directory");
    }
}
