using System.Buffers.Binary;
using System.Text;
using QcowTier.Tests.Infrastructure;
using QcowTier.Tests.Tiering.Support;

namespace QcowTier.Tests.Tiering;

/// <summary>
/// A tiered image whose HDD data file is missing, swapped, truncated or named outside the image's
/// folder is refused with a typed exception that names the file at fault.
/// </summary>
public sealed class TierErrorTests
{
    private static void MakeTiered(string path, int clusterSize = 4096, string dataFile = "data.hdd")
    {
        using var img = QcowImage.Create(path, 2 << 20, TierKit.Tiered(clusterSize, dataFile, StorageTier.Hdd));
        img.Write(0, Enumerable.Repeat((byte)0xaa, 1 << 20).ToArray());
        img.MoveToTier(0, 64 << 10, StorageTier.Ssd);
    }

    [Fact]
    public void Missing_data_file_is_refused_naming_it()
    {
        using var dir = new TempDir();
        var path = dir.File("img.qcow2");
        MakeTiered(path);
        var saved = File.ReadAllBytes(dir.File("data.hdd"));
        File.Delete(dir.File("data.hdd"));
        foreach (var ro in new[] { false, true })
        {
            var act = () => QcowImage.Open(path, new QcowOpenOptions { ReadOnly = ro });
            act.Should().Throw<QcowFormatException>().Where(e => e.Message.Contains(dir.File("data.hdd")) && e.Message.Contains("does not exist"));
        }
        File.Exists(dir.File("data.hdd")).Should().BeFalse("opening must not create the missing file");
        // Refusing did not damage anything: with the file back, the image opens and reads.
        File.WriteAllBytes(dir.File("data.hdd"), saved);
        using var img = QcowImage.Open(path, new QcowOpenOptions { ReadOnly = true });
        var buf = new byte[1 << 20];
        img.Read(0, buf);
        buf.Should().OnlyContain(x => x == 0xaa);
    }

    [Fact]
    public void Swapped_data_file_is_refused_naming_it()
    {
        using var dir = new TempDir();
        var a = dir.File("a.qcow2");
        var b = dir.File("b.qcow2");
        MakeTiered(a, dataFile: "a.hdd");
        MakeTiered(b, dataFile: "b.hdd");
        var aHdd = File.ReadAllBytes(dir.File("a.hdd"));
        File.Delete(dir.File("a.hdd"));
        File.Move(dir.File("b.hdd"), dir.File("a.hdd"));
        var act = () => QcowImage.Open(a, new QcowOpenOptions { ReadOnly = true });
        act.Should().Throw<QcowFormatException>()
            .Where(e => e.Message.Contains(dir.File("a.hdd")) && e.Message.Contains("swapped"));
        act = () => QcowImage.Open(a);
        act.Should().Throw<QcowFormatException>().Where(e => e.Message.Contains(dir.File("a.hdd")));

        // The override names a file explicitly; it must carry the image's UUID all the same.
        File.WriteAllBytes(dir.File("a-original.hdd"), aHdd);
        act = () => QcowImage.Open(b, new QcowOpenOptions { ReadOnly = true, TierDataFile = dir.File("a-original.hdd") });
        act.Should().Throw<QcowFormatException>().Where(e => e.Message.Contains("a-original.hdd"));
        using var ok = QcowImage.Open(a, new QcowOpenOptions { ReadOnly = true, TierDataFile = dir.File("a-original.hdd") });
        ok.TierDataFile.Should().Be(dir.File("a-original.hdd"));
        var buf = new byte[1 << 20];
        ok.Read(0, buf);
        buf.Should().OnlyContain(x => x == 0xaa);
    }

    [Fact]
    public void Data_file_that_is_not_a_tier_file_is_refused_naming_it()
    {
        using var dir = new TempDir();
        var path = dir.File("img.qcow2");
        MakeTiered(path);
        File.WriteAllBytes(dir.File("data.hdd"), new byte[8192]);
        var act = () => QcowImage.Open(path, new QcowOpenOptions { ReadOnly = true });
        act.Should().Throw<QcowFormatException>().Where(e => e.Message.Contains(dir.File("data.hdd")) && e.Message.Contains("magic"));
    }

    [Fact]
    public void Data_file_with_another_cluster_size_is_refused_naming_it()
    {
        using var dir = new TempDir();
        var path = dir.File("img.qcow2");
        MakeTiered(path);
        var hdd = dir.File("data.hdd");
        var bytes = File.ReadAllBytes(hdd);
        BinaryPrimitives.ReadUInt32BigEndian(bytes.AsSpan(12)).Should().Be(12, "the data file header records cluster_bits");
        BinaryPrimitives.WriteUInt32BigEndian(bytes.AsSpan(12), 16);
        File.WriteAllBytes(hdd, bytes);
        var act = () => QcowImage.Open(path, new QcowOpenOptions { ReadOnly = true });
        act.Should().Throw<QcowCorruptImageException>().Where(e => e.Message.Contains(hdd) && e.Message.Contains("cluster_bits"));
    }

    [Theory]
    [InlineData(false)]
    [InlineData(true)]
    public void Truncated_data_file_with_entries_past_its_end_is_refused_naming_it(bool readOnly)
    {
        using var dir = new TempDir();
        var path = dir.File("img.qcow2");
        MakeTiered(path);
        var hdd = dir.File("data.hdd");
        using (var fs = new FileStream(hdd, FileMode.Open))
        {
            fs.SetLength(fs.Length / 2);
        }
        using var img = QcowImage.Open(path, new QcowOpenOptions { ReadOnly = readOnly });
        var buf = new byte[1 << 20];
        var act = () => img.Read(0, buf);
        act.Should().Throw<QcowCorruptImageException>().Where(e => e.Message.Contains(hdd) && e.Message.Contains("past the end"));
        // The first 64 KiB were on SSD: still readable.
        var head = new byte[64 << 10];
        img.Read(0, head);
        head.Should().OnlyContain(x => x == 0xaa);
    }

    [Theory]
    [InlineData("../x.hdd")]
    [InlineData("/tmp/x.hd")]
    [InlineData("a/../../h")]
    public void Data_file_name_escaping_the_image_folder_is_refused(string evil)
    {
        using var dir = new TempDir();
        var path = dir.File("img.qcow2");
        const string name = "data-file.hdd";
        MakeTiered(path, dataFile: name);
        var bytes = File.ReadAllBytes(path);
        var (ext, len) = TierKit.FindTierExtension(bytes);
        Encoding.UTF8.GetString(bytes, ext + 58, BinaryPrimitives.ReadUInt16BigEndian(bytes.AsSpan(ext + 56))).Should().Be(name);
        // Same length or shorter, so it stays inside the extension: patch length and bytes.
        var evilBytes = Encoding.UTF8.GetBytes(evil);
        (58 + evilBytes.Length).Should().BeLessThanOrEqualTo(len);
        BinaryPrimitives.WriteUInt16BigEndian(bytes.AsSpan(ext + 56), (ushort)evilBytes.Length);
        evilBytes.CopyTo(bytes, ext + 58);
        File.WriteAllBytes(path, bytes);
        foreach (var ro in new[] { true, false })
        {
            var act = () => QcowImage.Open(path, new QcowOpenOptions { ReadOnly = ro });
            act.Should().Throw<QcowFormatException>()
                .Where(e => e.Message.Contains(path) && e.Message.Contains(evil) && e.Message.Contains("inside"));
        }
        // Naming the file explicitly is the sanctioned way to use a file elsewhere.
        using var img = QcowImage.Open(path, new QcowOpenOptions { ReadOnly = true, TierDataFile = dir.File(name) });
        var buf = new byte[4096];
        img.Read(512 << 10, buf);
        buf.Should().OnlyContain(x => x == 0xaa);
    }

    [Fact]
    public void Attach_refuses_a_data_file_outside_the_image_folder_or_already_present()
    {
        using var dir = new TempDir();
        var path = dir.File("img.qcow2");
        using (var plain = QcowImage.Create(path, 1 << 20))
        {
            plain.Write(0, new byte[] { 1, 2, 3 });
        }
        using var img = QcowImage.Open(path);
        var act = () => img.AttachTier(new QcowTierOptions { DataFile = "../escape.hdd" });
        act.Should().Throw<ArgumentException>();
        act = () => img.AttachTier(new QcowTierOptions { DataFile = Path.Combine(Path.GetTempPath(), "qcowtier-escape.hdd") });
        act.Should().Throw<ArgumentException>();
        File.WriteAllText(dir.File("taken.hdd"), "someone else's file");
        act = () => img.AttachTier(new QcowTierOptions { DataFile = "taken.hdd" });
        act.Should().Throw<IOException>();
        File.ReadAllText(dir.File("taken.hdd")).Should().Be("someone else's file");
        img.IsTiered.Should().BeFalse();
        // A data file of another image (a valid header naming another UUID) is refused too.
        File.WriteAllBytes(dir.File("other.hdd"), Format.TierDataFileHeader.Build(Guid.NewGuid(), 16, 65536));
        act = () => img.AttachTier(new QcowTierOptions { DataFile = "other.hdd" });
        act.Should().Throw<IOException>().WithMessage("*other.hdd*already exists*");
        // The file an interrupted attach of this image left (its header names this image) is taken over.
        File.WriteAllBytes(dir.File("mine.hdd"), Format.TierDataFileHeader.Build(img.HeatIdentity, 16, 65536));
        img.AttachTier(new QcowTierOptions { DataFile = "mine.hdd" });
        img.IsTiered.Should().BeTrue();
        img.MoveToTier(0, 1 << 20, StorageTier.Hdd);
        img.Flush();
        img.Read(0, new byte[3]);
        img.Dispose();
        using var reopened = QcowImage.Open(path, new QcowOpenOptions { ReadOnly = true });
        reopened.Check().IsClean.Should().BeTrue();
        var buf = new byte[3];
        reopened.Read(0, buf);
        buf.Should().Equal(1, 2, 3);
    }

    [Fact]
    public void Detach_keeps_the_identity_so_heat_maps_stay_valid_and_a_reattach_takes_the_old_file_over()
    {
        using var dir = new TempDir();
        var path = dir.File("img.qcow2");
        Guid id;
        using (var img = QcowImage.Create(path, 4 << 20, new QcowCreateOptions { Tier = new QcowTierOptions { DataFile = "d.hdd", DefaultTier = StorageTier.Hdd } }))
        {
            img.Write(0, new byte[65536]);
            id = img.HeatIdentity;
            img.DetachTier(deleteDataFile: false);
            img.HeatIdentity.Should().Be(id);
        }
        Qemu.AssertClean(path);
        using (var img = QcowImage.Open(path))
        {
            img.HeatIdentity.Should().Be(id);
            img.AttachTier(new QcowTierOptions { DataFile = "d.hdd" });
            img.HeatIdentity.Should().Be(id);
        }
    }
}
