using QcowTier.Tests.Infrastructure;

namespace QcowTier.Tests.Cli;

/// <summary>qcowtier amend and create -o data_file against qemu-img: same results, same errors.</summary>
public sealed class AmendAndDataFileCliTests
{
    private static string Base(TempDir dir, string name, string options)
    {
        var path = dir.File(name);
        Qemu.RunIn(dir.Path, "qemu-img", "create", "-q", "-f", "qcow2", "-o", options, name, "8M").EnsureSuccess();
        Qemu.RunIn(dir.Path, "qemu-io", "-f", "qcow2", "-c", "write -q -P 1 0 1M", "-c", "write -q -z 2M 1M", "-c", "write -q -z 0 64k", name).EnsureSuccess();
        return path;
    }

    [Theory]
    [InlineData("cluster_size=65536", "compat=0.10")]
    [InlineData("compat=0.10", "compat=1.1")]
    [InlineData("compat=0.10", "compat=1.1,lazy_refcounts=on,refcount_bits=4")]
    [InlineData("refcount_bits=64", "compat=0.10,refcount_bits=16")]
    [InlineData("lazy_refcounts=on", "lazy_refcounts=off")]
    [InlineData("cluster_size=4096", "refcount_bits=2,size=16M")]
    public void Amend_gives_what_qemu_img_amend_gives(string create, string amend)
    {
        using var dir = new TempDir();
        var ours = Base(dir, "ours.qcow2", create);
        var theirs = Base(dir, "theirs.qcow2", create);
        CliHarness.Run("amend", "-o", amend, ours).ExitCode.Should().Be(0);
        Qemu.Img("amend", "-o", amend, theirs).EnsureSuccess();
        Qemu.AssertClean(ours);
        Qemu.AssertSameContent(ours, theirs);
        var infoOurs = Qemu.Img("info", "--output=json", ours).StdOut.Replace("ours.qcow2", "x", StringComparison.Ordinal);
        var infoTheirs = Qemu.Img("info", "--output=json", theirs).StdOut.Replace("theirs.qcow2", "x", StringComparison.Ordinal);
        static string WithoutSizes(string s) => System.Text.RegularExpressions.Regex.Replace(s, @"""actual-size"": \d+", "");
        WithoutSizes(infoOurs).Should().Be(WithoutSizes(infoTheirs));
    }

    [Theory]
    [InlineData("refcount_bits=1", "compat=0.10")]
    [InlineData("cluster_size=65536", "compat=0.10,lazy_refcounts=on")]
    [InlineData("cluster_size=65536", "compat=0.10,refcount_bits=8")]
    [InlineData("cluster_size=65536", "compat=0.9")]
    [InlineData("data_file=d.data", "compat=0.10")]
    [InlineData("cluster_size=65536", "data_file=foo")]
    [InlineData("cluster_size=65536", "bogus=1")]
    public void Amend_refuses_what_qemu_img_refuses(string create, string amend)
    {
        using var dir = new TempDir();
        var path = Base(dir, "a.qcow2", create);
        var bytes = File.ReadAllBytes(path);
        var theirs = Qemu.RunIn(dir.Path, "qemu-img", "amend", "-o", amend, "a.qcow2");
        theirs.ExitCode.Should().Be(1);
        File.ReadAllBytes(path).Should().Equal(bytes, "qemu-img changed nothing");
        var ours = CliHarness.Run("amend", "-o", amend, path);
        ours.ShouldBeOneLineError();
        ours.ExitCode.Should().Be(1);
        ours.StdErr.Should().StartWith(CliHarness.AsOurs(theirs.StdErr.Split('\n')[0]));
        File.ReadAllBytes(path).Should().Equal(bytes, "the refusal changed nothing");
    }

    /// <summary>An image QEMU made with an absolute data_file name: the tool follows it as qemu-img does.</summary>
    [Fact]
    public void The_tool_follows_an_absolute_data_file_name_as_qemu_img()
    {
        using var dir = new TempDir();
        var path = dir.File("abs.qcow2");
        Qemu.Img("create", "-q", "-f", "qcow2", "-o", $"data_file={dir.File("abs.data")}", path, "4M").EnsureSuccess();
        Qemu.Io("-f", "qcow2", "-c", "write -P 0x42 100k 300k", path).EnsureSuccess();
        CliHarness.Run("check", path).ExitCode.Should().Be(0);
        CliHarness.Run("info", path).StdOut.Should().Contain($"data file: {dir.File("abs.data")}");
        CliHarness.Run("convert", "-O", "raw", path, dir.File("ours.raw")).ExitCode.Should().Be(0);
        Qemu.Img("convert", "-O", "raw", path, dir.File("theirs.raw")).EnsureSuccess();
        File.ReadAllBytes(dir.File("ours.raw")).Should().Equal(File.ReadAllBytes(dir.File("theirs.raw")));
        CliHarness.Run("io", "-c", "write -P 0x43 1M 64k", path).ExitCode.Should().Be(0);
        Qemu.Io("-f", "qcow2", "-c", "read -P 0x43 1M 64k", path).StdOut.Should().NotContain("verification failed");
        Qemu.AssertClean(path);
    }

    [Fact]
    public void Amend_needs_options()
    {
        using var dir = new TempDir();
        var path = Base(dir, "a.qcow2", "cluster_size=65536");
        CliHarness.Run("amend", path).ShouldBeOneLineError("Must specify options (-o)");
    }

    /// <summary>create -o data_file: features and extensions are QEMU's byte for byte (name aside), and the image works both ways.</summary>
    [Theory]
    [InlineData(4096, false)]
    [InlineData(65536, true)]
    public void Create_with_a_data_file_matches_qemu_img(int clusterSize, bool raw)
    {
        using var dir = new TempDir();
        var o = $"cluster_size={clusterSize},data_file=DATA{(raw ? ",data_file_raw=on" : "")}";
        var ours = CliHarness.Run("create", "-f", "qcow2", "-o", o.Replace("DATA", "o.raw", StringComparison.Ordinal), dir.File("o.qcow2"), "8M");
        ours.ExitCode.Should().Be(0, ours.StdErr);
        var theirs = Qemu.RunIn(dir.Path, "qemu-img", "create", "-f", "qcow2", "-o", o.Replace("DATA", "q.raw", StringComparison.Ordinal), "q.qcow2", "8M").EnsureSuccess();
        ours.StdOut.Replace("o.qcow2", "q.qcow2", StringComparison.Ordinal).Replace(dir.Path + "/", "", StringComparison.Ordinal).Replace("o.raw", "q.raw", StringComparison.Ordinal)
            .Should().Be(theirs.StdOut);
        // From the feature bits on (the table placement before them follows our allocator).
        var a = File.ReadAllBytes(dir.File("o.qcow2")).AsSpan(72, clusterSize - 72).ToArray();
        var b = File.ReadAllBytes(dir.File("q.qcow2")).AsSpan(72, clusterSize - 72).ToArray();
        a[120 - 72] = b[120 - 72]; // the names differ in one letter
        a.Should().Equal(b);
        new FileInfo(dir.File("o.raw")).Length.Should().Be(new FileInfo(dir.File("q.raw")).Length);

        foreach (var name in new[] { "o.qcow2", "q.qcow2" })
        {
            CliHarness.Run("io", "-c", "write -P 7 100k 200k", "-c", "write -z 1M 64k", dir.File(name)).ExitCode.Should().Be(0);
        }
        Qemu.RunIn(dir.Path, "qemu-img", "check", "o.qcow2").EnsureSuccess();
        Qemu.RunIn(dir.Path, "qemu-img", "compare", "o.qcow2", "q.qcow2").EnsureSuccess();
        var info = CliHarness.Run("info", dir.File("q.qcow2"));
        info.StdOut.Should().Contain("data file: q.raw").And.Contain($"data file raw: {(raw ? "true" : "false")}");
        CliHarness.Run("map", "--output=json", dir.File("q.qcow2")).StdOut
            .Should().Be(Qemu.RunIn(dir.Path, "qemu-img", "map", "--output=json", "q.qcow2").StdOut);
    }

    /// <summary>Data clusters of an external data file are not refcounted, and guest cluster 0 sits at host offset 0.</summary>
    [Theory]
    [InlineData("human")]
    [InlineData("json")]
    public void Check_of_a_data_file_image_prints_what_qemu_img_prints(string output)
    {
        using var dir = new TempDir();
        Qemu.RunIn(dir.Path, "qemu-img", "create", "-q", "-f", "qcow2", "-o", "data_file=c.raw,cluster_size=4096", "c.qcow2", "1M").EnsureSuccess();
        Qemu.RunIn(dir.Path, "qemu-io", "-f", "qcow2", "-c", "write -q 0 8k", "-c", "write -q 12k 4k", "-c", "write -q -z 64k 4k", "c.qcow2").EnsureSuccess();
        var theirs = Qemu.RunIn(dir.Path, "qemu-img", "check", "--output=" + output, "c.qcow2");
        var ours = CliHarness.Run("check", "--output=" + output, dir.File("c.qcow2"));
        ours.ExitCode.Should().Be(theirs.ExitCode).And.Be(0);
        ours.StdOut.Replace(dir.Path + "/", "", StringComparison.Ordinal).Should().Be(theirs.StdOut);
    }
}
