using QcowTier.Tests.Infrastructure;

namespace QcowTier.Tests.Cli;

public sealed class CreateCliTests
{
    public static TheoryData<string, string[], string?> Cases => new()
    {
        { "qcow2", [], "64M" },
        { "qcow2", ["-o", "cluster_size=4k,refcount_bits=8"], "1G" },
        { "qcow2", ["-o", "compat=0.10"], "100" },
        { "qcow2", ["-o", "compat=v3,lazy_refcounts=on,preallocation=metadata"], "10M" },
        { "qcow2", ["-o", "compat=1.1,lazy_refcounts,preallocation=off"], "1.5M" },
        { "qcow2", ["-o", "cluster_size=0x1000", "-o", "cluster_size=8k"], "12345" },
        { "qcow2", ["-o", "size=2M"], null },
        { "qcow2", ["-o", "refcount_bits=64,lazy_refcounts=off"], "1T" },
        { "raw", [], "10M" },
        { "raw", ["-o", "preallocation=off"], "12345" },
    };

    [Theory]
    [MemberData(nameof(Cases))]
    public void Formatting_line_and_image_match_qemu_img(string format, string[] options, string? size)
    {
        using var dir = new TempDir();
        var ours = dir.File("ours.img");
        var theirs = dir.File("theirs.img");
        string[] Args(string path) => size is null ? ["create", "-f", format, .. options, path] : ["create", "-f", format, .. options, path, size];
        var q = Qemu.Img(Args(theirs)).EnsureSuccess();
        var r = CliHarness.Run(Args(ours));

        r.ExitCode.Should().Be(0, r.StdErr);
        r.StdErr.Should().BeEmpty();
        r.StdOut.Should().Be(q.StdOut.Replace(theirs, ours, StringComparison.Ordinal));
        var infoOurs = Qemu.Img("info", "--output=json", ours).EnsureSuccess().StdOut;
        var infoTheirs = Qemu.Img("info", "--output=json", theirs).EnsureSuccess().StdOut;
        Field(infoOurs, "virtual-size").Should().Be(Field(infoTheirs, "virtual-size"));
        Field(infoOurs, "cluster-size").Should().Be(Field(infoTheirs, "cluster-size"));
        Field(infoOurs, "compat").Should().Be(Field(infoTheirs, "compat"));
        Field(infoOurs, "lazy-refcounts").Should().Be(Field(infoTheirs, "lazy-refcounts"));
        Field(infoOurs, "refcount-bits").Should().Be(Field(infoTheirs, "refcount-bits"));
        if (format == "qcow2")
        {
            Qemu.AssertClean(ours);
            Qemu.AssertSameContent(ours, theirs);
        }
        else
        {
            new FileInfo(ours).Length.Should().Be(new FileInfo(theirs).Length);
        }
    }

    [Fact]
    public void Create_replaces_an_existing_file_as_qemu_img_does()
    {
        using var dir = new TempDir();
        var path = dir.File("a.qcow2");
        File.WriteAllBytes(path, new byte[5 << 20]);
        CliHarness.Run("create", "-q", "-f", "qcow2", path, "1M").ExitCode.Should().Be(0);
        Qemu.AssertClean(path);
        Field(Qemu.Img("info", "--output=json", path).StdOut, "virtual-size").Should().Be("1048576");
    }

    [Theory]
    [InlineData("1x")]
    [InlineData("-1")]
    [InlineData("abc")]
    public void Bad_size_is_one_line_and_exit_1_like_qemu_img(string size)
    {
        using var dir = new TempDir();
        var q = Qemu.Img("create", "-f", "qcow2", dir.File("q.qcow2"), "--", size);
        var r = CliHarness.Run("create", "-f", "qcow2", dir.File("o.qcow2"), "--", size);
        r.ExitCode.Should().Be(q.ExitCode).And.Be(1);
        r.ShouldBeOneLineError("Invalid image size specified");
        File.Exists(dir.File("o.qcow2")).Should().BeFalse();
    }

    [Theory]
    [InlineData("foo=bar", "Invalid parameter 'foo'")]
    [InlineData("cluster_size=3000", "Cluster size must be a power of two between 512 and 2048k")]
    [InlineData("refcount_bits=3", "Refcount width must be a power of two and may not exceed 64 bits")]
    [InlineData("compat=0.10,refcount_bits=8", "Different refcount widths than 16 bits require compatibility level 1.1")]
    [InlineData("compat=0.10,lazy_refcounts=on", "Lazy refcounts only supported with compatibility level 1.1")]
    [InlineData("compat=2", "Parameter 'version' does not accept value '2'")]
    [InlineData("lazy_refcounts=maybe", "Parameter 'lazy_refcounts' expects 'on' or 'off'")]
    [InlineData("cluster_size=abc", "Parameter 'cluster_size' expects a non-negative number below 2^64")]
    [InlineData("preallocation=foo", "Parameter 'preallocation' does not accept value 'foo'")]
    public void Option_errors_carry_qemu_img_wording(string options, string message)
    {
        using var dir = new TempDir();
        var theirs = dir.File("t.qcow2");
        var ours = dir.File("o.qcow2");
        var q = Qemu.Img("create", "-f", "qcow2", "-o", options, theirs, "1M");
        var r = CliHarness.Run("create", "-f", "qcow2", "-o", options, ours, "1M");

        q.ExitCode.Should().Be(1);
        q.StdErr.Should().Contain(message);
        r.ExitCode.Should().Be(1);
        r.ShouldBeOneLineError($"{ours}: {message}");
        // The "Formatting" line comes first exactly when qemu-img prints it.
        r.StdOut.Should().Be(q.StdOut.Replace(theirs, ours, StringComparison.Ordinal));
    }

    [Fact]
    public void Missing_size_and_double_size_are_errors()
    {
        using var dir = new TempDir();
        var path = dir.File("a.qcow2");
        CliHarness.Run("create", "-f", "qcow2", path).ShouldBeOneLineError("Image creation needs a size parameter");
        CliHarness.Run("create", "-f", "qcow2", "-o", "size=1M", path, "2M").ShouldBeOneLineError("The image size must be specified only once");
        CliHarness.Run("create", "-f", "foo", path, "1M").ShouldBeOneLineError("Unknown file format 'foo'");
        CliHarness.Run("create", "-f", "vmdk", path, "1M").ShouldBeOneLineError("Unsupported file format 'vmdk'");
    }

    internal static string? Field(string json, string name)
    {
        var key = $"\"{name}\": ";
        var at = json.IndexOf(key, StringComparison.Ordinal);
        if (at < 0)
        {
            return null;
        }
        var start = at + key.Length;
        var end = json.IndexOfAny([',', '\n', '}'], start);
        return json[start..end].Trim().Trim('"');
    }
}
