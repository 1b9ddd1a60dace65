using QcowTier.Tests.Infrastructure;

namespace QcowTier.Tests.Cli;

public sealed class InfoCliTests
{
    public static TheoryData<string, string, string> Images => new()
    {
        { "qcow2", "cluster_size=65536", "64M" },
        { "qcow2", "compat=0.10", "1G" },
        { "qcow2", "cluster_size=4096,refcount_bits=1", "100M" },
        { "qcow2", "lazy_refcounts=on", "3G" },
        { "qcow2", "preallocation=metadata", "20M" },
        { "raw", "preallocation=off", "10M" },
    };

    [Theory]
    [MemberData(nameof(Images))]
    public void Info_matches_qemu_img_in_both_formats(string format, string options, string size)
    {
        using var dir = new TempDir();
        var path = dir.File("image");
        Qemu.Img("create", "-q", "-f", format, "-o", options, path, size).EnsureSuccess();
        CliHarness.QemuIo(path, format, "write -P 7 0 1M", "write -P 9 5M 12k");

        foreach (var output in new[] { "human", "json" })
        {
            var q = Qemu.Img("info", "--output=" + output, path).EnsureSuccess();
            var r = CliHarness.Run("info", "--output=" + output, path);
            r.ExitCode.Should().Be(0, r.StdErr);
            r.StdOut.Should().Be(q.StdOut);
            r.StdErr.Should().BeEmpty();
        }
        // -f given explicitly, and the "--output json" spelling.
        CliHarness.Run("info", "-f", format, "--output", "json", path).StdOut
            .Should().Be(Qemu.Img("info", "-f", format, "--output", "json", path).StdOut);
    }

    [Fact]
    public void Format_is_probed_from_the_magic_not_the_name()
    {
        using var dir = new TempDir();
        var qcowNamedRaw = dir.File("disk.raw");
        var rawNamedQcow = dir.File("disk.qcow2");
        Qemu.Img("create", "-q", "-f", "qcow2", qcowNamedRaw, "1M").EnsureSuccess();
        Qemu.Img("create", "-q", "-f", "raw", rawNamedQcow, "1M").EnsureSuccess();
        CliHarness.Run("info", qcowNamedRaw).StdOut.Should().Be(Qemu.Img("info", qcowNamedRaw).StdOut).And.Contain("file format: qcow2");
        CliHarness.Run("info", rawNamedQcow).StdOut.Should().Be(Qemu.Img("info", rawNamedQcow).StdOut).And.Contain("file format: raw");
    }

    [Fact]
    public void Odd_sized_raw_file_reports_qemu_img_virtual_size()
    {
        using var dir = new TempDir();
        var path = dir.File("odd.raw");
        File.WriteAllBytes(path, [1, 2, 3, 4, 5]);
        CliHarness.Run("info", "--output=json", path).StdOut.Should().Be(Qemu.Img("info", "--output=json", path).StdOut);
        CliHarness.Run("info", path).StdOut.Should().Be(Qemu.Img("info", path).StdOut);
    }

    [Fact]
    public void Wrong_explicit_format_is_refused()
    {
        using var dir = new TempDir();
        var path = dir.File("plain.raw");
        Qemu.Img("create", "-q", "-f", "raw", path, "1M").EnsureSuccess();
        var q = Qemu.Img("info", "-f", "qcow2", path);
        var r = CliHarness.Run("info", "-f", "qcow2", path);
        r.ExitCode.Should().Be(q.ExitCode).And.Be(1);
        r.ShouldBeOneLineError($"Could not open '{path}': Image is not in qcow2 format");
    }

    [Fact]
    public void Bad_output_format_is_refused_like_qemu_img()
    {
        using var dir = new TempDir();
        var path = dir.File("a.qcow2");
        Qemu.Img("create", "-q", "-f", "qcow2", path, "1M").EnsureSuccess();
        var q = Qemu.Img("info", "--output=xml", path);
        var r = CliHarness.Run("info", "--output=xml", path);
        r.ExitCode.Should().Be(q.ExitCode).And.Be(1);
        r.StdErr.Trim().Should().Be(CliHarness.AsOurs(q.StdErr.Trim()));
    }

    [Theory]
    [InlineData(0)]
    [InlineData(1)]
    public void Dirty_and_corrupt_bits_show_as_in_qemu_img(int bit)
    {
        using var dir = new TempDir();
        var path = dir.File("flagged.qcow2");
        Qemu.Img("create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on", path, "16M").EnsureSuccess();
        ImageSurgery.SetIncompatibleBit(path, bit);
        foreach (var output in new[] { "human", "json" })
        {
            var q = Qemu.Img("info", "--output=" + output, path).EnsureSuccess();
            CliHarness.Run("info", "--output=" + output, path).StdOut.Should().Be(q.StdOut);
        }
    }

    [Fact]
    public void Internal_snapshots_are_listed_as_by_qemu_img()
    {
        using var dir = new TempDir();
        var path = CliHarness.MixedQcow(dir);
        Qemu.Img("snapshot", "-c", "first", path).EnsureSuccess();
        CliHarness.QemuIo(path, "qcow2", "write -P 8 10M 64k");
        Qemu.Img("snapshot", "-c", "second snapshot name", path).EnsureSuccess();
        foreach (var output in new[] { "human", "json" })
        {
            var q = Qemu.Img("info", "--output=" + output, path).EnsureSuccess();
            var r = CliHarness.Run("info", "--output=" + output, path);
            r.ExitCode.Should().Be(0, r.StdErr);
            r.StdOut.Should().Be(q.StdOut);
        }
    }
}
