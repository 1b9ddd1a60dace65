using QcowTier.Tests.Infrastructure;

namespace QcowTier.Tests.Cli;

public sealed class MapCliTests
{
    private static void AssertSameMap(string path, params string[] extra)
    {
        foreach (var output in new[] { "human", "json" })
        {
            string[] args = ["map", "--output=" + output, .. extra, path];
            var q = Qemu.Img(args).EnsureSuccess();
            var r = CliHarness.Run(args);
            r.ExitCode.Should().Be(0, r.StdErr);
            r.StdOut.Should().Be(q.StdOut, $"map {string.Join(' ', args)}");
        }
    }

    [Theory]
    [InlineData("cluster_size=65536")]
    [InlineData("cluster_size=4096")]
    [InlineData("compat=0.10")]
    [InlineData("cluster_size=2M")]
    public void Data_zero_and_unallocated_clusters_map_as_qemu_img(string options)
    {
        using var dir = new TempDir();
        AssertSameMap(CliHarness.MixedQcow(dir, options: options));
    }

    [Theory]
    [InlineData("--start-offset=100k", "--max-length=1M")]
    [InlineData("--start-offset=1k", "--max-length=3000")]
    [InlineData("--start-offset=2M", "--max-length=100G")]
    [InlineData("--start-offset=1G", "--max-length=1M")]
    public void Ranges_map_as_qemu_img(string start, string length)
    {
        using var dir = new TempDir();
        AssertSameMap(CliHarness.MixedQcow(dir), start, length);
    }

    [Fact]
    public void Metadata_preallocated_images_map_their_holes_as_zero_as_qemu_img()
    {
        using var dir = new TempDir();
        var path = dir.File("prealloc.qcow2");
        Qemu.Img("create", "-q", "-f", "qcow2", "-o", "preallocation=metadata", path, "4M").EnsureSuccess();
        CliHarness.QemuIo(path, "qcow2", "write -P 1 64k 64k", "write -z 1M 64k", "write -P 2 2M 4k");
        AssertSameMap(path);
    }

    [Fact]
    public void Images_written_by_qcowtier_map_as_qemu_img_maps_them()
    {
        using var dir = new TempDir();
        var path = dir.File("ours.qcow2");
        CliHarness.Run("create", "-q", "-f", "qcow2", "-o", "preallocation=metadata", path, "8M").ExitCode.Should().Be(0);
        CliHarness.Run("io", "-c", "write -P 1 64k 64k", "-c", "write -z 1M 64k", "-c", "write -P 2 2M 4k", "-c", "discard 3M 1M", path).ExitCode.Should().Be(0);
        AssertSameMap(path);
        var plain = dir.File("plain.qcow2");
        CliHarness.Run("create", "-q", "-f", "qcow2", plain, "8M").ExitCode.Should().Be(0);
        CliHarness.Run("io", "-c", "write -P 1 0 4k", "-c", "write -P 1 1M 64k", "-c", "write -z 2M 64k", plain).ExitCode.Should().Be(0);
        AssertSameMap(plain);
    }

    [Fact]
    public void Raw_files_map_their_extents_as_qemu_img()
    {
        using var dir = new TempDir();
        var path = dir.File("disk.raw");
        Qemu.Img("create", "-q", "-f", "raw", path, "10M").EnsureSuccess();
        CliHarness.QemuIo(path, "raw", "write -P 1 1M 64k", "write -P 2 4M 4k");
        AssertSameMap(path);
        var odd = dir.File("odd.raw");
        File.WriteAllText(odd, "hi\n");
        AssertSameMap(odd);
        var hole = dir.File("hole.raw");
        using (var f = File.Create(hole))
        {
            f.SetLength(10001);
        }
        AssertSameMap(hole);
    }

    [Fact]
    public void Compressed_clusters_map_and_check_as_qemu_img()
    {
        using var dir = new TempDir();
        var plain = CliHarness.MixedQcow(dir, "plain.qcow2");
        var packed = dir.File("packed.qcow2");
        Qemu.Img("convert", "-c", "-O", "qcow2", plain, packed).EnsureSuccess();
        var qj = Qemu.Img("map", "--output=json", packed).EnsureSuccess();
        CliHarness.Run("map", "--output=json", packed).StdOut.Should().Be(qj.StdOut);
        // The human format cannot show compressed clusters: qemu-img fails, and so do we.
        var qh = Qemu.Img("map", packed);
        var rh = CliHarness.Run("map", packed);
        rh.ExitCode.Should().Be(qh.ExitCode).And.Be(1);
        rh.StdOut.Should().Be(qh.StdOut);
        rh.ShouldBeOneLineError("File contains external, encrypted or compressed clusters.");
        foreach (var output in new[] { "human", "json" })
        {
            var q = Qemu.Img("check", "--output=" + output, packed);
            var r = CliHarness.Run("check", "--output=" + output, packed);
            r.ExitCode.Should().Be(q.ExitCode);
            r.StdOut.Should().Be(q.StdOut);
        }
    }
}
