using QcowTier.Tests.Infrastructure;

namespace QcowTier.Tests.Cli;

public sealed class CompareCliTests
{
    private static void AssertSameCompare(params string[] args)
    {
        var q = Qemu.Img(["compare", .. args]);
        var r = CliHarness.Run(["compare", .. args]);
        r.ExitCode.Should().Be(q.ExitCode, $"compare {string.Join(' ', args)}: {q.StdOut}{q.StdErr} / {r.StdOut}{r.StdErr}");
        r.StdOut.Should().Be(q.StdOut);
    }

    [Fact]
    public void Identical_and_different_images_as_qemu_img()
    {
        using var dir = new TempDir();
        var a = CliHarness.MixedQcow(dir, "a.qcow2");
        var b = dir.File("b.raw");
        Qemu.Img("convert", "-O", "raw", a, b).EnsureSuccess();
        AssertSameCompare(a, b);
        AssertSameCompare("-f", "qcow2", "-F", "raw", a, b);
        CliHarness.QemuIo(b, "raw", "write -P 9 3000000 10");
        AssertSameCompare(a, b);
        AssertSameCompare(b, a);
        AssertSameCompare("-q", a, b);
    }

    [Fact]
    public void Zero_versus_unallocated_is_identical_but_not_in_strict_mode()
    {
        using var dir = new TempDir();
        var a = dir.File("a.qcow2");
        var b = dir.File("b.qcow2");
        Qemu.Img("create", "-q", "-f", "qcow2", a, "8M").EnsureSuccess();
        Qemu.Img("create", "-q", "-f", "qcow2", b, "8M").EnsureSuccess();
        CliHarness.QemuIo(a, "qcow2", "write -P 0 1M 64k", "write -z 2M 64k");
        AssertSameCompare(a, b);
        AssertSameCompare("-s", a, b);
    }

    [Fact]
    public void Mismatch_offset_is_the_first_differing_sector()
    {
        using var dir = new TempDir();
        var a = dir.File("a.qcow2");
        var b = dir.File("b.qcow2");
        Qemu.Img("create", "-q", "-f", "qcow2", a, "8M").EnsureSuccess();
        Qemu.Img("create", "-q", "-f", "qcow2", b, "8M").EnsureSuccess();
        CliHarness.QemuIo(a, "qcow2", "write -P 1 1M 64k");
        CliHarness.QemuIo(b, "qcow2", "write -P 1 1M 64k", "write -P 2 1100000 1");
        AssertSameCompare(a, b);
        CliHarness.QemuIo(a, "qcow2", "write -P 7 5M 100");
        AssertSameCompare(a, b);
    }

    [Fact]
    public void Images_of_different_sizes()
    {
        using var dir = new TempDir();
        var small = dir.File("small.qcow2");
        var big = dir.File("big.qcow2");
        Qemu.Img("create", "-q", "-f", "qcow2", small, "64M").EnsureSuccess();
        Qemu.Img("create", "-q", "-f", "qcow2", big, "128M").EnsureSuccess();
        AssertSameCompare(small, big);
        AssertSameCompare(big, small);
        AssertSameCompare("-s", small, big);
        CliHarness.QemuIo(big, "qcow2", "write -P 1 100M 1");
        AssertSameCompare(small, big);
        AssertSameCompare(big, small);
        CliHarness.QemuIo(small, "qcow2", "write -P 1 1M 4k");
        AssertSameCompare(small, big);
    }

    [Fact]
    public void Missing_file_exits_2_with_one_line()
    {
        using var dir = new TempDir();
        var a = CliHarness.MixedQcow(dir);
        var missing = dir.File("nope.qcow2");
        var q = Qemu.Img("compare", a, missing);
        var r = CliHarness.Run("compare", a, missing);
        r.ExitCode.Should().Be(q.ExitCode).And.Be(2);
        r.ShouldBeOneLineError($"Could not open '{missing}': No such file or directory");
    }
}
